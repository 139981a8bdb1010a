import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


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
