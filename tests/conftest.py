import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
if not torch.cuda.is_available():  # the GPU kernels run in Triton's interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, visibly (-ra), on machines without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: a parameter id "gpu" is one
            item.add_marker(skip)


def pytest_sessionstart(session):
    """Build the C++ kernels before any test: a compile error stops the run here, with the compiler's output,
    instead of surfacing as failures (or skips) scattered over the suite."""
    from levante.errors import KernelBuildError
    from levante.quant.extension import extension

    try:
        extension()
    except KernelBuildError as e:
        pytest.exit(f"levante's C++ kernels do not build:\n{e}", returncode=1)


@pytest.fixture(scope="session")
def tmp_models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same random state, so no test depends on luck."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory):
    """`levante serve` (the default model, SmolLM2-135M-Instruct, as model "levante") in its own process."""
    import httpx

    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen([sys.executable, "-m", "levante", "serve", "--port", str(port), "-c", "2048",
                                 "--max-batch", "8", "--log-level", "warning", "--model-alias", "levante"],
                                stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, f"levante serve exited: {log.read_text()[-2000:]}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "levante serve did not come up"
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
