"""Compile the Triton kernels levante launches for a real GPU target (the H200's sm_90), without a GPU.

The tests run every kernel under TRITON_INTERPRET=1, which checks its arithmetic but not that it compiles for a GPU,
nor what it costs there (shared memory per block, registers, spills). `recording()` notes each launch made under
the interpreter (the kernel, its arguments' types and alignment, the constexprs and launch options as a GPU run
would have them); `compile_records` compiles each distinct kernel in a subprocess without the interpreter (where
`@triton.jit` gives real JIT functions) through the kernel's own `JITFunction.run` under a compile-only driver
(levante.cuda.precompile.compile_launch, what a GPU decoder's warm-up compiles ahead with), and reads the registers
and spills from the ptxas Triton ships (-v). The records are compiled by the Triton the tests import (CI's) and by
the lent GPU machine's (`GPU_TRITON`, installed beside it by `make test-deps`): the GPU runs what its own compiles.

    python tests/triton_aot.py RECORDS.json REPORT.json     # the subprocess: compile the records
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from levante.cuda.precompile import compile_key, compile_launch, recorded_launches

ROOT = Path(__file__).resolve().parents[1]
H200 = dict(arch=90, warp_size=32, max_shared=232448, max_regs=255)  # bytes of shared memory a block may opt into
# the lent GPU machine's Triton (/work/.library/device: torch 2.11, CUDA 13, Triton 3.6), kept out of site-packages
# (Makefile's gpu-triton); LEVANTE_GPU_TRITON: another folder holding it
GPU_TRITON = "3.6.0"
GPU_TRITON_DIR = Path(os.environ.get("LEVANTE_GPU_TRITON", Path.home() / ".cache" / "levante-triton" / GPU_TRITON))


def triton_path(triton_dir: Path) -> str:
    """`triton_dir` as a PYTHONPATH entry, checked to hold a Triton (a clear error where `make test-deps` has not
    run)."""
    if not (triton_dir / "triton" / "__init__.py").is_file():
        raise FileNotFoundError(f"no Triton in {triton_dir}: `make test-deps` installs the GPU machine's there")
    return str(triton_dir)


def recording(run: bool = True):
    """Every Triton launch inside the block, as a JSON-able record, run as well unless `run=False`
    (levante.cuda.precompile's recorder: IEEE, which the interpreter picks differently, recorded as a GPU picks
    it)."""
    return recorded_launches(run=run)


def compile_records(records: list[dict], workdir: Path, triton_dir: Path | None = None,
                    sass: bool | Callable[[dict], bool] = True) -> tuple[str, list[dict]]:
    """One record of each kernel (levante.cuda.precompile.compile_key: records that differ only in integers Triton
    does not specialize on are one) compiled for the H200 (in a subprocess without the interpreter, by the Triton in
    `triton_dir`, default the one installed): the record plus `stages` (the most pipeline stages, from the launch's
    own down to one, whose shared memory fits: what levante.cuda.triton_matmul.run falls back to), `shared`,
    `regs`, `spill` (bytes of stack per thread, 0 when nothing spills), with `sass` (for every record, or those
    it returns True for) the hottest loop's `loop` and `conversions` (`_resources`), or `error` (the compiler's
    message). Returns (the Triton version, the report)."""
    first = [triton_path(triton_dir)] if triton_dir is not None else []
    src, dst = workdir / "records.json", workdir / "report.json"
    kernels: dict[str, dict] = {}
    for r in records:
        kernels.setdefault(compile_key(r), r)
    chosen = list(kernels.values())
    src.write_text(json.dumps({"records": chosen, "sass": [sass(r) if callable(sass) else sass for r in chosen]}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*first, str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, __file__, str(src), str(dst)], env=env, capture_output=True, text=True,
                          timeout=1200)
    if done.returncode:
        raise RuntimeError(f"the compile subprocess failed:\n{done.stderr[-4000:]}")
    out = json.loads(dst.read_text())
    return out["triton"], out["report"]


def _resources(ptx: str, name: str, workdir: Path, sass: bool = True) -> dict:
    """Registers and spilled bytes per thread, from the ptxas Triton itself runs for the target (-v); with `sass`,
    `loop`: the machine instructions (SASS, per thread) of the kernel's hottest loop, by nvdisasm (~0.3 s a
    kernel), and `conversions`: its int <-> float conversions."""
    from triton.backends.nvidia.compiler import get_ptxas

    path, cubin = workdir / f"{name}.ptx", workdir / f"{name}.cubin"
    path.write_text(ptx)
    ptxas = get_ptxas(H200["arch"]).path
    done = subprocess.run([ptxas, f"-arch=sm_{H200['arch']}a", "-v", str(path), "-o", str(cubin)],
                          capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spill = re.search(r"(\d+) bytes spill stores", done.stderr)
    if done.returncode or regs is None or spill is None:
        raise RuntimeError(f"ptxas -v on {name}: {done.stderr[-500:]}")
    resources = {"regs": int(regs.group(1)), "spill": int(spill.group(1))}
    if not sass:
        return resources
    listing = subprocess.run([str(Path(ptxas).parent / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    loop = hot_loop(listing)
    return dict(resources, loop=len(loop), conversions=sum(op.split(".")[0] in CONVERSIONS for op in loop))


def hot_loop(sass: str) -> list[str]:
    """The opcodes of the longest loop of nvdisasm's listing: from a label to the last branch back to it (none when
    the kernel has no loop)."""
    at: dict[str, int] = {}  # label -> index of its first instruction
    branches: list[tuple[int, str]] = []
    ops: list[str] = []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            at[label.group(1)] = len(ops)
            continue
        op = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", line)
        if op:
            target = re.search(r"BRA\s.*`\(\.(L_x_\d+)\)", line)
            if target:
                branches.append((len(ops), target.group(1)))
            ops.append(op.group(1))
    loops = [(i + 1 - at[t], at[t], i) for i, t in branches if t in at and at[t] <= i]
    if not loops:
        return []
    _, first, last = max(loops)
    return ops[first:last + 1]


# int <-> float conversions: Hopper issues them at 16 per clock and SM (CUDA C++ Programming Guide, arithmetic
# instructions' throughput), against 64 for integer and 128 for float32 arithmetic
CONVERSIONS = ("I2F", "I2FP", "F2I", "F2IP")


def _compile_one(rec: dict, workdir: Path, sass: bool) -> dict:
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", H200["arch"], H200["warp_size"])
    compiled, stages = compile_launch(rec, target, H200["max_shared"])
    out = dict(rec, stages=compiled.metadata.num_stages if stages is None else stages, shared=compiled.metadata.shared)
    out.update(_resources(compiled.asm["ptx"], rec["kernel"], workdir, sass))
    return out


def _compile_or_error(job: tuple[int, dict, Path, bool]) -> dict:
    i, rec, workdir, sass = job
    try:
        return _compile_one(rec, workdir / str(i), sass)
    except Exception as e:  # noqa: BLE001 - the report names the kernel and the compiler's message
        return dict(rec, error=f"{type(e).__name__}: {str(e)[:2000]}")


def main(src: str, dst: str) -> None:
    from concurrent.futures import ProcessPoolExecutor

    import triton

    workdir = Path(dst).parent
    job = json.loads(Path(src).read_text())
    for i in range(len(job["records"])):
        (workdir / str(i)).mkdir(exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        report = list(pool.map(_compile_or_error, [(i, r, workdir, sass) for i, (r, sass) in
                                                   enumerate(zip(job["records"], job["sass"], strict=True))]))
    Path(dst).write_text(json.dumps({"triton": triton.__version__, "report": report}))


if __name__ == "__main__":
    main(*sys.argv[1:])
