"""levante.cuda.precompile: a dry run of a decoder's steps on a meta copy of its model records the Triton launches
the real steps make, and the kernels compiled from those records are the ones a real launch looks up in Triton's
cache (checked through Triton's own JIT entry point, for an sm_90 target, without a GPU), with the installed Triton
and with the GPU machine's (tests/triton_aot.py's GPU_TRITON)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
from fixtures import Q4_K_M, hf_model, mixtral_8x7b_layer, save_hf
from triton_aot import GPU_TRITON, GPU_TRITON_DIR, triton_path

from levante.cuda import CudaDecoder, fuse_moe, pack_weights
from levante.cuda.decoder import BUCKETS
from levante.cuda.precompile import (
    compile_key,
    compile_launches,
    decoder_launches,
    distinct,
    meta_copy,
    recorded_launches,
)
from levante.generate import _prefill_positions
from levante.loader import load

H200 = (["cuda", 90, 32], 232448)


def _model(tmp_path: Path, kind: str, quant: str | None, layers: int = 2):
    """A bf16 model (packed weights of a GGUF `quant`; rows of 256 values for the K-quants' super-blocks) whose
    tensors own their memory, as on a GPU: on CPU some are views of the memory-mapped file, at offsets that are not
    16-byte aligned."""
    d = 256 if quant == "Q4_K_M" else 128
    src = save_hf(hf_model(kind, vocab_size=256, hidden_size=d, intermediate_size=d, num_hidden_layers=layers),
                  tmp_path / "m")
    path = src
    if quant is not None:
        from levante.tools.quantize import quantize_model

        path = quantize_model(src, tmp_path / f"m.{quant}.gguf", quant, progress=False)
    net = load(path, dtype="bfloat16").model
    if quant is not None:
        assert pack_weights(net) > 0
    return net._apply(torch.clone), path


def _keys(records: list[dict]) -> set[str]:
    return {json.dumps(r, sort_keys=True) for r in records}


def test_meta_copy_keeps_shapes_and_the_model():
    net = torch.nn.Linear(8, 4).to(torch.bfloat16)
    view = torch.nn.Module()
    base = torch.randn(10)
    view.register_buffer("tail", base[3:])
    for m in (net, view):
        copy = meta_copy(m)
        for (name, t), (_, c) in zip(m.state_dict().items(), copy.state_dict().items(), strict=True):
            assert c.device.type == "meta" and c.shape == t.shape and c.dtype == t.dtype, name
            assert c.stride() == t.stride() and c.storage_offset() == t.storage_offset()
    assert net.weight.device.type == "cpu" and view.tail.data_ptr() == base.data_ptr() + 12
    assert isinstance(meta_copy(net).weight, torch.nn.Parameter)


# every tier of the kernels' tiles lies below 140 tokens; past it, a sample up to the 512-token chunk
LENGTHS = [*range(1, 140), 200, 255, 256, 257, 300, 511, 512]
# several prompts at once (an LLM given a list): rows x the longest prompt's tokens (1: the decode step's path)
BATCHES = [(rows, t) for rows in (2, 3, 4, 5, 7, 8, 9, 16, 33, 100) for t in (1, 2, 5, 9, 16, 17, 33, 100, 512)]
# prompts of several lengths, left-padded and run packed: (rows, the longest's tokens, real tokens of the chunk)
PACKED = [(rows, t, real) for rows in (2, 3, 5, 8, 9, 33) for t in (2, 9, 33, 512)
          for real in (1, 2, 3, 5, 8, 9, 17, 100, 129, 1000) if real < rows * t]
AWQ = dict.fromkeys(("wq", "wk", "wv", "wo", "w1", "w3", "w2"), "AWQ4")


@pytest.mark.parametrize("scheme", [None, Q4_K_M, AWQ], ids=["bf16", "Q4_K_M", "AWQ"])
def test_every_prompt_and_batch_finds_its_kernels_compiled(scheme):
    """What the warm-up's dry run compiles (every bucket's decode step, WARM_PREFILLS) is all that a one-row prefill
    of any length up to a chunk, a prefill of several prompts and a decode step of any batch launch, in a context
    of 4096 tokens or of 40 (prompts of several lengths too, run packed): a Mixtral-8x7B layer at its real sizes
    (what the tiles and GEMVs choose depends on them)."""
    dec = CudaDecoder(mixtral_8x7b_layer(scheme))
    for n_ctx in (4096, 40):
        warm = {compile_key(r) for r in decoder_launches(dec, BUCKETS, n_ctx, torch.bfloat16)}  # as warm_up's
        shapes = [(1, t) for t in LENGTHS] + BATCHES + PACKED
        for shape in (s for s in shapes if s[1] <= n_ctx):
            launched = decoder_launches(dec, (), n_ctx, torch.bfloat16, prefill=[shape])
            missing = sorted({r["kernel"] for r in launched if compile_key(r) not in warm})
            assert not missing, f"prefill {shape} (rows, tokens[, real]; n_ctx {n_ctx}) compiles {missing} at first use"
        launched = decoder_launches(dec, (512, 768), n_ctx, torch.bfloat16, prefill=())  # past the last bucket
        assert {compile_key(r) for r in launched} <= warm


@pytest.mark.parametrize(("kind", "quant"), [("mixtral_8x2", None), ("mixtral_8x2", "Q4_K_M"),
                                             ("mistral_dense", "Q8_0")])
def test_dry_run_records_the_launches_of_the_real_steps(tmp_path, kind, quant):
    """The decode step of each bucket, a prefill, a speculative verification (every token's logits) and a packed
    prefill of two prompts, run for real under the interpreter, launch exactly the kernels (constexprs, dtypes,
    alignments, integers) the dry run on the meta copy records; the model is untouched. One layer: every layer
    launches the same kernels."""
    net, _ = _model(tmp_path, kind, quant, layers=1)
    fuse_moe(net)
    dec = CudaDecoder(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with recorded_launches() as real, torch.inference_mode():
        cache = dec.new_cache(4, 64)
        for b in BUCKETS[:3]:
            dec._step(torch.zeros(b, 1, dtype=torch.long), torch.full((b, 1), -1), cache, True)
        dec(torch.randint(3, 256, (1, 20)), torch.arange(20)[None], cache, last_only=True)
        dec(torch.randint(3, 256, (1, 5)), torch.arange(20, 25)[None], cache)  # a speculative verification
        tokens, positions = _prefill_positions([list(range(3, 23)), [3, 4, 5, 6, 7]], 20)
        dec(tokens, positions, cache, last_only=True)  # prompts of two lengths: run packed, 25 tokens
    dry = decoder_launches(dec, BUCKETS[:3], 64, cache.dtype, prefill=(20, (2, 20, 25)), verify=(5,))
    assert len(dry) > 10 and _keys(dry) == _keys(distinct(real))
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) and after[k].device.type == "cpu" for k, v in before.items())


def test_a_parallel_ranks_dry_run_runs_no_hook(tmp_path):
    """A tensor-parallel rank's decoder (forward hooks: its all-reduces) records the launches of its real steps,
    and the hooks never run in the dry run (a collective the other ranks would wait for)."""
    net, _ = _model(tmp_path, "mixtral_8x2", None)
    calls = []

    def reduce(_module, _inputs, out):
        calls.append(out.shape)
        return out

    for block in net.model.layers:
        block.attn.register_forward_hook(reduce)
        block.ffn.register_forward_hook(reduce)
    fuse_moe(net)
    dec = CudaDecoder(net)
    with recorded_launches() as real, torch.inference_mode():
        cache = dec.new_cache(2, 64)
        for b in (1, 2):
            dec._step(torch.zeros(b, 1, dtype=torch.long), torch.full((b, 1), -1), cache, True)
        dec(torch.randint(3, 256, (1, 20)), torch.arange(20)[None], cache, last_only=True)
    seen = len(calls)
    dry = decoder_launches(dec, (1, 2), 64, cache.dtype, prefill=(20,))
    assert seen == 12 and len(calls) == seen and _keys(dry) == _keys(distinct(real))


_LOOKUP = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import triton
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from levante.cuda import CudaDecoder, fuse_moe, pack_weights
    from levante.cuda.precompile import _CompileOnly, dry_steps
    from levante.loader import load

    path, quant, cache_dir = sys.argv[1:4]
    driver.set_active(_CompileOnly(GPUTarget("cuda", 90, 32)))
    run = jit.JITFunction.run
    compiled = []

    def compile_only(self, *args, grid, warmup, **kwargs):  # the real launch's path, up to the launch itself
        compiled.append(run(self, *args, grid=grid, warmup=True, **kwargs))

    jit.JITFunction.run = compile_only
    net = load(path, dtype="bfloat16").model
    if quant != "none":
        pack_weights(net)
    net._apply(torch.clone)
    fuse_moe(net)
    before = set(os.listdir(cache_dir))
    dry_steps(CudaDecoder(net), (1, 2), 64, torch.bfloat16, prefill=(20,))
    print(json.dumps({"launches": len(compiled), "new": sorted(set(os.listdir(cache_dir)) - before),
                      "triton": triton.__version__}))
    """
)


@pytest.mark.parametrize("version", ["installed", "gpu_machine"])
@pytest.mark.parametrize(("kind", "quant"), [("mixtral_8x2", None), ("mistral_dense", "Q8_0")])
def test_precompiled_kernels_are_the_ones_launches_look_up(tmp_path, monkeypatch, kind, quant, version):
    """Records compiled by `compile_launches` (a pool of processes, for sm_90) fill Triton's cache with exactly
    what the real JIT entry point then looks up for the same steps: no launch compiles anything more. Both
    subprocesses (the compile pool and the lookup) run the installed Triton or the GPU machine's (the cache key
    is computed by the version's own code)."""
    import levante.cuda.precompile as precompile

    if version == "gpu_machine":
        first = triton_path(GPU_TRITON_DIR)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([first, os.environ.get("PYTHONPATH", "")]))
    net, path = _model(tmp_path, kind, quant)
    fuse_moe(net)
    dec = CudaDecoder(net)
    records = decoder_launches(dec, (1, 2), 64, torch.bfloat16, prefill=(20,))
    cache_dir = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(precompile, "device_target", lambda device: H200)  # the decoder's device: an H200
    report = precompile.precompile_decoder(dec, (1, 2), 64, torch.bfloat16, prefill=(20,), workers=2)
    kernels = {compile_key(r) for r in records}  # records that differ only in what Triton ignores: one kernel
    assert report["errors"] == [] and report["kernels"] == len(kernels) < len(records) and report["workers"] == 2
    assert len(os.listdir(cache_dir)) > 5
    assert compile_launches(records, *H200)["kernels"] == 0  # this process had them compiled: nothing to do
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", _LOOKUP, str(path), quant or "none", str(cache_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["triton"] == (GPU_TRITON if version == "gpu_machine" else triton.__version__)
    assert out["launches"] >= len(records) and out["new"] == []


def test_a_dry_run_leaves_other_threads_launches_alone():
    """While one thread records launches instead of running them (a decoder's warm-up), another thread's kernels
    (a server's running steps) still run and are not recorded."""
    import threading

    from levante.cuda.triton_fused import silu_mul

    gate, up = torch.randn(2, 64), torch.randn(2, 64)
    got = {}
    with recorded_launches(run=False) as records:
        silu_mul(gate, up)  # this thread: recorded, not run
        worker = threading.Thread(target=lambda: got.setdefault("out", silu_mul(gate, up)))
        worker.start()
        worker.join()
    assert len(records) == 1 and records[0]["kernel"] == "_silu_mul_kernel"
    torch.testing.assert_close(got["out"], torch.nn.functional.silu(gate) * up)


def test_compiling_past_its_time_is_stopped(tmp_path, monkeypatch):
    """A compile that overruns its time (a hung compiler must not hold a warm-up) ends with TimeoutError, its
    subprocess's whole process group killed."""
    import subprocess
    import time

    from levante.cuda.triton_fused import silu_mul

    with recorded_launches(run=False) as records:
        silu_mul(torch.randn(2, 64), torch.randn(2, 64))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    started = []

    class Spied(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Spied)
    t = time.perf_counter()
    with pytest.raises(TimeoutError, match="compiling 1 kernels took over 0 s"):
        compile_launches(records, *H200, workers=1, timeout=0.3)
    assert time.perf_counter() - t < 10
    with pytest.raises(ProcessLookupError):
        os.killpg(started[0].pid, 0)  # no process of its group is left


def test_a_failed_precompile_is_logged_not_raised(caplog):
    """Compiling ahead is an optimisation: when it cannot run (here: no CUDA device), warm-up goes on and the
    kernels compile at their first launch."""
    from levante.cuda.precompile import precompile_decoder

    class NoDevice:
        lm = torch.nn.Module()

    with caplog.at_level("WARNING", logger="levante.cuda"):
        assert precompile_decoder(NoDevice(), (1,), 8, torch.bfloat16) is None
    assert "compile at first use" in caplog.text
