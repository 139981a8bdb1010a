import atexit
import os
import sys

from .cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports it in a parallel worker
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, a normal interpreter exit of rank 0 aborts now and then (~1 run in 20: "terminate called
        # without an active exception", from torch.distributed's C++ teardown): run the exit handlers (they stop
        # the other ranks), flush, and leave without the C++ static destructors.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
