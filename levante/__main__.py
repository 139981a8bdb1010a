import sys

from .cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports it in a parallel worker
    sys.exit(main())
