"""Builds and loads levante's C++ CPU extension from the sources in levante/csrc.

The extension is compiled for the machine it runs on (`-march=native`), just in time on first use, with
torch.utils.cpp_extension and ninja, and cached under ~/.cache/levante/torch_extensions (or
$LEVANTE_EXTENSIONS_DIR) in a directory named by a hash of the sources, the flags, torch's version and
this CPU's feature flags; later processes load the cached module in milliseconds. `levante kernels`
(run by `make install`) builds it ahead of time and prints what it has.

Failures are loud where they are bugs and quiet where they are the machine's: a machine without a C++
compiler or ninja gets one warning and the pure-torch path (same numbers, slower); LEVANTE_NO_EXT=1 asks
for that path explicitly. A compile, link or import error on a machine that has the tools raises
KernelBuildError with the compiler's output, never a silent fallback. LEVANTE_EXT_WERROR=1 (set by
`make test`) also turns compiler warnings into errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..errors import KernelBuildError

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
LDFLAGS = ["-fopenmp"]

_EXT: ModuleType | None = None
_ERROR: KernelBuildError | None = None
_TRIED = False
_LOCK = threading.Lock()


def build_dir() -> Path:
    """Where compiled extensions are cached."""
    base = os.environ.get("LEVANTE_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "levante", "torch_extensions"
    )
    return Path(base)


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def sources() -> list[Path]:
    """Every file of the extension's source (the .cpp files are compiled, the headers included)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def _gcc_major() -> int | None:
    """The major version of the C++ compiler when it is GCC, else None."""
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        return None
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = subprocess.run([cxx, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "clang" in out.lower() or not version.strip().split(".")[0].isdigit():
        return None
    return int(version.strip().split(".")[0])


def _flags() -> list[str]:
    flags = list(CFLAGS)
    major = _gcc_major()
    if major is not None and major < 13:
        # GCC 12's intrinsics initialise their "undefined" vectors from themselves (GCC bug 105593, fixed in
        # 13), which -Wuninitialized reports at every inlined AVX-512 reduction; a pragma cannot reach them
        flags += ["-Wno-uninitialized", "-Wno-maybe-uninitialized"]
    if os.environ.get("LEVANTE_EXT_WERROR", "") not in ("", "0"):
        flags.append("-Werror")
    return flags


def module_name() -> str:
    """The cached module's name: a hash of what the binary depends on."""
    h = hashlib.sha1()
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(" ".join(_flags()).encode() + torch.__version__.encode() + " ".join(sorted(cpu_flags())).encode())
    return f"levante_ext_{h.hexdigest()[:12]}"


def missing_tools() -> list[str]:
    """The build tools this machine lacks (a C++ compiler, ninja)."""
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        missing.append(f"a C++ compiler ({os.environ.get('CXX', 'c++')})")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    return missing


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Hold an flock on the build directory, clearing a baton that a killed build left behind.

    torch's own build lock is a file (`lock`) that a builder deletes when it finishes: a build killed midway
    leaves it, and every later build then waits for it forever. Every levante build holds this flock (which the
    kernel releases when its holder dies) around torch's, so a `lock` file seen while holding it is stale.
    """
    with open(directory / ".levante-build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached) extension; raises KernelBuildError on any failure."""
    from torch.utils.cpp_extension import load

    missing = missing_tools()
    if missing:
        raise KernelBuildError(f"cannot build levante's C++ kernels: missing {', '.join(missing)}")
    name = module_name()
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _build_lock(directory):
            return load(
                name=name,
                sources=[str(p) for p in sources() if p.suffix == ".cpp"],
                extra_cflags=_flags(),
                extra_ldflags=LDFLAGS,
                extra_include_paths=[str(CSRC)],
                build_directory=str(directory),
                verbose=verbose,
            )
    except Exception as e:  # compile / link / import error: a bug to report, not a reason to go slow silently
        raise KernelBuildError(
            f"levante's C++ kernels failed to build in {directory}:\n{e}\n"
            "(set LEVANTE_NO_EXT=1 to run the slower pure-torch path instead)"
        ) from e


def disabled() -> bool:
    """LEVANTE_NO_EXT=1: the pure-torch path was asked for."""
    return os.environ.get("LEVANTE_NO_EXT", "") not in ("", "0")


def extension() -> ModuleType | None:
    """The compiled extension, or None where it cannot be built (LEVANTE_NO_EXT=1, no compiler or ninja).

    Built once per process (the first call compiles or loads the cache); a build error raises KernelBuildError.
    """
    global _EXT, _ERROR, _TRIED
    if _TRIED and _ERROR is None:
        return _EXT
    with _LOCK:
        if _ERROR is not None:
            raise _ERROR
        if _TRIED:
            return _EXT
        if disabled():
            _TRIED = True
            return None
        missing = missing_tools()
        if missing:
            warnings.warn(
                f"levante: C++ kernels unavailable (missing {', '.join(missing)}); using the slower torch path",
                stacklevel=2,
            )
            _TRIED = True
            return None
        _TRIED = True
        try:
            _EXT = build()
        except KernelBuildError as e:  # remembered: every later call raises the same error, without rebuilding
            _ERROR = e
            raise
    return _EXT


def describe() -> dict:
    """What `levante kernels` prints: the module, its cache directory and its instruction-set paths."""
    ext = extension()
    if ext is None:
        return {"built": False, "reason": "LEVANTE_NO_EXT=1" if disabled() else "missing " + ", ".join(missing_tools())}
    name = module_name()
    return {"built": True, "module": name, "path": str(build_dir() / name), "isa": list(ext.isa())}
