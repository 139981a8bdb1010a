"""Triton kernels compiled in parallel, before their first launch.

Triton compiles a kernel the first time it is launched with new constexprs, argument dtypes or alignments, in the
launching thread, one after another. A GPU decoder's warm-up meets dozens of them (a decode step per batch bucket:
GEMVs of 1 to 8 rows per weight format, the fused small ops, attention; prefills: the tiled kernels): for a
Mixtral-8x7B-shaped Q4_K_M model, the decode steps of every bucket and prefills of one prompt of any length up to a
chunk or of several prompts launch 56 distinct ones, which Triton 3.6 compiles for sm_90 in 20.9 s one after
another on a 2-core machine (11.1 s in 2 processes); the GPU benchmark's five weight formats: 140 (26.2 s in 2).
`precompile_decoder` runs those steps on a copy of the model on the meta device (shapes, no values), with every
Triton launch recorded instead of run (`recorded_launches`), and compiles the distinct launches in a pool of
processes (`compile_launches`, in a subprocess: `main`) into Triton's on-disk cache, where the real launches find
them. Each is compiled through the kernel's own JIT entry point (`JITFunction.run` with warmup=True, under a driver
that only names the target: `compile_launch`), so it is cached under the key the real launch looks up.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger("levante.cuda")

# one-row prefills whose kernels are compiled ahead: the first length of each tier, so that together they launch
# every kernel a prompt of up to 512 tokens (a chunk: longer prompts are prefilled 512 at a time) will, also where
# the context is shorter than a later tier: GEMVs of 2, 3-4 and 5-8 rows, the tiled kernels' row tiers (levante.cuda.
# triton_matmul dot_launch: 9, 17, 33, 97, 129) and attention's 16- and 64-query tiles, for a count of queries that
# is a multiple of 16 (16, 32) and one that is not (Triton specializes such integers; the tiled GEMMs' rows and the
# experts' pairs are marked do_not_specialize instead: their sm_90 code is the same either way). Checked for every
# length by tests/test_cuda_precompile.py.
PREFILL_TOKENS = (2, 3, 5, 9, 16, 17, 32, 33, 97, 129)
# prefills of several prompts at once (an LLM given a list), as (rows, tokens): what one-row prefills and the decode
# buckets do not launch is the LM head's GEMV over the rows' last tokens with 16-bit inputs (2, 3-4, 5-8 rows; a
# decode step stores them as float32). Checked for batches of up to 100 prompts by tests/test_cuda_precompile.py.
BATCH_PREFILLS = ((2, 9), (3, 9), (5, 9))
WARM_PREFILLS = PREFILL_TOKENS + BATCH_PREFILLS
# the class attributes recorded_launches and meta_copy replace for a while: one thread at a time; the replacements
# act for that thread only
_PATCHING = threading.RLock()


def launch_spec(v):
    """A launch argument as JSON: a tensor by its dtype and whether its address is 16-byte aligned (what Triton
    specializes on), other values as they are."""
    if isinstance(v, Tensor):
        return {"dtype": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise TypeError(f"cannot record a {type(v).__name__} argument")


def launch_arg(spec):
    """An argument with the recorded spec: a small CPU tensor of the dtype, one element in when not aligned."""
    if isinstance(spec, dict):
        t = torch.empty(64, dtype=getattr(torch, spec["dtype"]))
        return t if spec["aligned"] else t[1:]
    return spec


@contextmanager
def recorded_launches(run: bool = True) -> Iterator[list[dict]]:
    """Every Triton launch inside the block, as a JSON-able record (module, kernel, args, kwargs: the constexprs and
    num_warps / num_stages), as a GPU would make it (IEEE, which levante picks differently under the interpreter:
    levante.cuda.triton_matmul.use_ieee, recorded for the kernel's first tensor as a GPU picks it); `run=False`:
    recorded instead of run (their outputs keep whatever they held). Only this thread's launches: another thread's
    (a server's running steps) run as usual."""
    import triton.runtime.jit as jit

    from .triton_matmul import use_ieee

    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every Triton levante supports has the interpreter
        pass
    records: list[dict] = []
    originals = {cls: cls.__dict__["run"] for cls in classes}
    owner = threading.get_ident()

    def spying(original):
        def spy(self, *args, grid, warmup, **kwargs):
            if threading.get_ident() != owner:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            rec_kwargs = {k: launch_spec(v) for k, v in kwargs.items()}
            if "IEEE" in kwargs:
                first = next(a for a in args if isinstance(a, Tensor))
                rec_kwargs["IEEE"] = use_ieee(first.dtype, interpreted=False)
            rec = {"module": self.fn.__module__, "kernel": self.fn.__name__,
                   "args": [launch_spec(a) for a in args], "kwargs": rec_kwargs}
            if unspecialized := _unspecialized(self):
                rec["unspecialized"] = unspecialized
            records.append(rec)
            return original(self, *args, grid=grid, warmup=warmup, **kwargs) if run else None

        return spy

    with _PATCHING:
        for cls, original in originals.items():
            cls.run = spying(original)
        try:
            yield records
        finally:
            for cls, original in originals.items():
                cls.run = original


def _unspecialized(kernel) -> list[int]:
    """The positions of a kernel's arguments marked do_not_specialize (a JITFunction keeps the list, the
    interpreter's InterpretedFunction the decorator's keywords)."""
    marked = getattr(kernel, "do_not_specialize", None)
    if marked is None:
        marked = getattr(kernel, "kwargs", {}).get("do_not_specialize") or []
    return [i for i, name in enumerate(kernel.arg_names) if i in marked or name in marked]


def distinct(records: list[dict]) -> list[dict]:
    """The records without repeats, in their order."""
    seen, out = set(), []
    for r in records:
        key = json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def compile_key(r: dict) -> str:
    """A record without what Triton does not compile by: an integer's value beyond being 1, a multiple of 16
    (neither for an argument marked do_not_specialize), or too wide for 32 bits (two records of one key are one
    kernel; where this errs, a kernel is compiled twice, or at its first launch)."""
    unspecialized = set(r.get("unspecialized", ()))

    def spec(i, a):
        if isinstance(a, int) and not isinstance(a, bool):
            wide = not -(2**31) <= a < 2**31
            return ["int", wide] if i in unspecialized else ["int", a == 1, a % 16 == 0, wide]
        return a

    args = [spec(i, a) for i, a in enumerate(r["args"])]
    return json.dumps([r["module"], r["kernel"], args, r["kwargs"]], sort_keys=True)


def _no_op_hook(_module: nn.Module, _inputs, _output) -> None:
    return None


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose tensors are on the meta device (same shapes, strides, storage offsets and
    dtypes, no memory): the model's steps run on it as shape computations. Its modules' forward hooks (a parallel
    rank's all-reduces: a collective the other ranks would wait for) are there but do nothing."""

    saved = torch.Tensor.__deepcopy__, nn.Parameter.__deepcopy__
    owner = threading.get_ident()

    def tensor(t: Tensor, memo: dict) -> Tensor:
        if threading.get_ident() != owner:  # another thread's deep copy: as usual
            return saved[0](t, memo)
        n = t.untyped_storage().nbytes() // t.element_size()
        return torch.empty(n, dtype=t.dtype, device="meta").as_strided(t.shape, t.stride(), t.storage_offset())

    def parameter(p: nn.Parameter, memo: dict) -> nn.Parameter:
        if threading.get_ident() != owner:
            return saved[1](p, memo)
        return nn.Parameter(tensor(p, memo), requires_grad=False)

    memo = {id(hook): _no_op_hook for m in module.modules() for hook in m._forward_hooks.values()}
    with _PATCHING:
        torch.Tensor.__deepcopy__, nn.Parameter.__deepcopy__ = tensor, parameter
        try:
            return copy.deepcopy(module, memo)
        finally:
            torch.Tensor.__deepcopy__, nn.Parameter.__deepcopy__ = saved


# a one-row prefill's tokens, (rows, tokens), or (rows, tokens, real): left-padded rows run packed, `real` tokens
Prefill = int | tuple[int, int] | tuple[int, int, int]


def dry_steps(decoder, buckets: Sequence[int], max_tokens: int, dtype: torch.dtype, slack: int = 0,
              prefill: Sequence[Prefill] = WARM_PREFILLS, verify: Sequence[int] = ()) -> None:
    """`decoder`'s (a CudaDecoder's) decode step for each batch bucket of `buckets`, over a cache of `max_tokens`
    tokens per row (+ `slack`), a prefill of each shape in `prefill` (a one-row prefill's length, (rows, tokens),
    or (rows, tokens, real tokens): left-padded rows, run packed) and a one-row call returning the logits of every
    token (speculative decoding's verification) of each length in `verify` that fits, run on a meta copy of its
    model: shapes only, nothing allocated; its Triton launches are whatever the caller makes them."""
    dry = type(decoder)(meta_copy(decoder.lm), use_graphs=False, float32_inputs=decoder.float32_inputs)
    meta = torch.device("meta")
    shapes = [((1, p) if isinstance(p, int) else tuple(p), True) for p in prefill] + [((1, t), False) for t in verify]
    cache = dry.new_cache(max([*buckets, *(shape[0] for shape, _ in shapes)]), max_tokens, dtype, slack)
    with torch.inference_mode():
        for b in buckets:
            dry._step(torch.zeros(b, 1, dtype=torch.long, device=meta),
                      torch.full((b, 1), -1, dtype=torch.long, device=meta), cache, True)
        for (rows, t, *real), last_only in shapes:
            if t <= max_tokens:
                tokens = torch.zeros(rows, t, dtype=torch.long, device=meta)
                positions = torch.arange(t, device=meta).expand(rows, t)
                if real:  # the indices real_tokens would find: their count is all the step's shapes depend on
                    dry._step(tokens, positions, cache, last_only, keep=torch.arange(real[0], device=meta))
                else:
                    dry(tokens, positions, cache, last_only=last_only)


def decoder_launches(decoder, buckets: Sequence[int], max_tokens: int, dtype: torch.dtype, slack: int = 0,
                     prefill: Sequence[Prefill] = WARM_PREFILLS, verify: Sequence[int] = ()) -> list[dict]:
    """The distinct Triton launches of `dry_steps`, recorded, none run."""
    with recorded_launches(run=False) as records:
        dry_steps(decoder, buckets, max_tokens, dtype, slack, prefill, verify)
    return distinct(records)


class _CompileOnly:
    """The Triton driver of a process that only compiles: it names the target (device 0, stream 0); nothing is
    launched there."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def compile_launch(rec: dict, target, max_shared: int):
    """The recorded launch compiled for `target` (a triton GPUTarget) by the kernel's own entry point
    (`JITFunction.run`, warmup=True: compile, no launch), so that Triton's cache holds it under the key the real
    launch computes; a launch that names its stages is compiled with fewer while its shared memory exceeds
    `max_shared` (what levante.cuda.triton_matmul.run falls back to). Returns (the compiled kernel, its stages)."""
    from triton.runtime import driver

    driver.set_active(_CompileOnly(target))
    kernel = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    args = [launch_arg(a) for a in rec["args"]]
    kwargs = {k: launch_arg(v) for k, v in rec["kwargs"].items()}
    stages = kwargs.pop("num_stages", None)
    while True:
        staged = kwargs if stages is None else dict(kwargs, num_stages=stages)
        compiled = kernel.run(*args, grid=(1,), warmup=True, **staged)
        if stages is None or stages == 1 or compiled.metadata.shared <= max_shared:
            return compiled, stages
        stages -= 1


def _compile_job(job: tuple[dict, list, int]) -> str | None:
    rec, target, max_shared = job
    from triton.backends.compiler import GPUTarget

    try:
        compile_launch(rec, GPUTarget(*target), max_shared)
        return None
    except Exception as e:  # noqa: BLE001 - the report names the kernel; its launch will raise the error itself
        return f"{rec['kernel']}: {type(e).__name__}: {str(e)[:300]}"


def device_target(device: torch.device) -> tuple[list, int]:
    """Triton's target for a CUDA device ([backend, arch, warp size]) and the shared memory a block may opt into."""
    from triton.runtime import driver

    with torch.cuda.device(device):
        t = driver.active.get_current_target()
    props = torch.cuda.get_device_properties(device)
    return [t.backend, t.arch, t.warp_size], props.shared_memory_per_block_optin


MAX_WORKERS = 16  # default pool size at most (each process holds torch and LLVM; a warm-up has ~30-100 kernels)
_COMPILED: set[str] = set()  # records this process has had compiled (per cache folder and target): not sent again


def compile_launches(records: list[dict], target: list, max_shared: int, workers: int | None = None,
                     timeout: float | None = None) -> dict:
    """Compile the records this process has not had compiled yet into Triton's on-disk cache, in a subprocess (no
    CUDA, no interpreter) with a pool of `workers` processes (default: one per CPU, MAX_WORKERS at most); past
    `timeout` seconds (default: 60 + 10 per kernel a process compiles, several times what one takes) the
    subprocess and its pool are killed and TimeoutError raised. Returns {"kernels" (compiled now), "workers",
    "seconds", "errors"}."""
    cache = os.environ.get("TRITON_CACHE_DIR", "")
    by_key = {json.dumps([cache, target, max_shared, compile_key(r)]): r for r in records}
    todo = [r for key, r in by_key.items() if key not in _COMPILED]
    workers = max(1, min(workers or min(os.cpu_count() or 1, MAX_WORKERS), len(todo)))
    if timeout is None:
        timeout = 60 + 10 * -(-len(todo) // workers)
    t0 = time.perf_counter()
    errors: list[str] = []
    if todo:
        with tempfile.TemporaryDirectory(prefix="levante-precompile-") as d:
            src, dst = Path(d) / "launches.json", Path(d) / "errors.json"
            src.write_text(json.dumps({"target": list(target), "max_shared": max_shared, "records": todo}))
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            # this levante, also where it was put on sys.path by hand (a script's own path)
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
            code = "import sys; from levante.cuda.precompile import main; main(*sys.argv[1:])"
            # a session of its own: on a timeout, the subprocess and its pool's processes are killed together
            proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(dst), str(workers)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                _, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise TimeoutError(f"compiling {len(todo)} kernels took over {timeout:.0f} s") from None
            if proc.returncode:
                raise RuntimeError(f"the compile processes failed: {stderr[-2000:]}")
            errors = json.loads(dst.read_text())
        _COMPILED.update(by_key)
    return {"kernels": len(todo), "workers": workers, "seconds": time.perf_counter() - t0, "errors": errors}


def precompile_decoder(decoder, buckets: Sequence[int], max_tokens: int, dtype: torch.dtype, slack: int = 0,
                       prefill: Sequence[Prefill] = WARM_PREFILLS, verify: Sequence[int] = (),
                       workers: int | None = None) -> dict | None:
    """Compile, in parallel, the kernels `decoder`'s steps will launch (`decoder_launches`), for its CUDA device.
    Best effort: a failure is logged and the kernels compile at their first launch as before (returns None)."""
    try:
        records = decoder_launches(decoder, buckets, max_tokens, dtype, slack, prefill, verify)
        target, max_shared = device_target(decoder.model.device)
        report = compile_launches(records, target, max_shared, workers)
    except Exception as e:  # noqa: BLE001 - an optimisation: the launches compile one by one instead
        log.warning("compiling the decoder's kernels ahead failed (%s: %s); they compile at first use",
                    type(e).__name__, str(e)[:300])
        return None
    log.info("compiled %d Triton kernels in %.1f s (%d processes)", report["kernels"], report["seconds"],
             report["workers"])
    for err in report["errors"]:
        log.warning("compiling ahead: %s", err)
    return report


def main(src: str, dst: str, workers: str) -> None:
    """The compile subprocess: the records of `src` compiled by `workers` processes; the errors written to `dst`."""
    from concurrent.futures import ProcessPoolExecutor

    job = json.loads(Path(src).read_text())
    for module in {r["module"] for r in job["records"]}:  # imported once, before the pool's processes fork
        importlib.import_module(module)
    jobs = [(r, job["target"], job["max_shared"]) for r in job["records"]]
    with ProcessPoolExecutor(max_workers=int(workers)) as pool:
        errors = [e for e in pool.map(_compile_job, jobs) if e is not None]
    Path(dst).write_text(json.dumps(errors))
