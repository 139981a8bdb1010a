"""Issue 13's GPU targets, side by side in one run on one GPU: levante's CUDA path vs the HBM limit and transformers.

    python benchmarks/cuda_bench.py --tokenizer tokenizer.model [--out benchmarks/results]
    (on the lent GPU machine: --out "$OUT", the only folder whose files come back; the results are saved after
    every section, so a run cut off by its time limit still returns what it measured. Its image lacks fastapi,
    uvicorn and pydantic, which the server section needs: `make gpu-files` puts their wheels (Python 3.12) and the
    Mixtral tokenizer into .gpu/; carry `.gpu` and run
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site && \
        python3 benchmarks/cuda_bench.py --tokenizer .gpu/tokenizer.model --out "$OUT")
    TRITON_INTERPRET=1 python benchmarks/cuda_bench.py --smoke --tokenizer ...   # the script itself, on CPU

Model: a random Mixtral with Mixtral-8x7B's shapes (hidden 4096, ffn 14336, 32 / 8 heads, 8 experts top-2, vocab
32000) and 4 layers, made here with transformers (bf16 safetensors), loaded with levante on the GPU; the same
weights in transformers (eager) are the peer. Quantized variants keep the model's shapes with random codes and
scales in each format's packed layout (quantizing 1.5 B parameters with levante's numpy quantizer would take most
of the GPU time; the kernels' speed does not depend on the values, their exactness is checked at these shapes
against the dequantized weights): Q4_K_M (attention q/k/o and expert gate/up Q4_K, v and down Q6_K, head Q6_K),
Q8_0, AWQ 4-bit g128 (head bf16), int8 rows (load_in_8bit); and a low-rank model (`levante compress`'s form:
experts as random bf16 factors with half their parameters, one expert per layer kept full).

Measured, each with the prompt of 512 tokens and 128 greedy new tokens through `LLM(...)(ids, max_tokens=128)`:
the first generation of a fresh LLM (whose construction compiled the kernels of every bucket's decode step and of
prefills ahead, in parallel processes, and captured the batch-1 graph, as vLLM does at start-up; its start-up time
is reported) and a warm one; decode tok/s = (new tokens - 1) / (time after the first token). The HBM limit is the
active bytes a batch-1 step reads (attention, router, 2 of 8 experts per layer, the head) over the
device-to-device copy rate measured here.
Batch 32 x 64 new tokens (the LLM's first call with 32 prompts, which captures its bucket's graph, and the
next); prefill 512 vs transformers; the OpenAI server (HTTP, streamed) with 32 concurrent clients vs 1; the
serving engine with 32 concurrent clients vs 1, with each new request
prefilled alone vs those admitted together in one packed call, and with the clients sampling (the server's
defaults, llama.cpp's) vs greedy; `sample()` of 32 rows per kind of request, and under sync-debug mode; a
prefill of 32 prompts of 16..512 tokens, packed (only the real tokens through the projections and the MoE) vs
padded; the profile of one decode step;
`torch.cuda.set_sync_debug_mode("error")` around a captured step; last, the batch-1 kernels one by one (GEMV vs
tiled, a few launch configurations) as fractions of the copy rate.
Writes OUT/cuda_bench.md (on CUDA; --smoke prints only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from levante import LLM  # noqa: E402
from levante.cuda import CudaDecoder, fuse_moe  # noqa: E402
from levante.cuda.packed import quantize_randomly, random_packed  # noqa: E402
from levante.cuda.precompile import compile_launches, device_target, recorded_launches  # noqa: E402
from levante.loader import LoadedModel, load  # noqa: E402
from levante.quant.base import DenseWeight  # noqa: E402
from levante.sampling import SamplingParams, make_generator, sample  # noqa: E402

MIXTRAL_4L = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                  num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=4096, rope_theta=1e6)
SMOKE = dict(MIXTRAL_4L, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
GREEDY = SamplingParams.greedy()
SAMPLERS = {  # what sampled requests ask for: the OpenAI server's defaults, and llama.cpp's (SamplingParams())
    "greedy": GREEDY,
    "server defaults (temperature 1)": SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                      repeat_penalty=1.0),
    "llama.cpp defaults": SamplingParams(),
}
SCHEMES = {  # weight role -> format
    "Q4_K_M": dict(wq="Q4_K", wk="Q4_K", wv="Q6_K", wo="Q4_K", w1="Q4_K", w3="Q4_K", w2="Q6_K", lm_head="Q6_K"),
    "Q8_0": dict(wq="Q8_0", wk="Q8_0", wv="Q8_0", wo="Q8_0", w1="Q8_0", w3="Q8_0", w2="Q8_0", lm_head="Q8_0"),
    "AWQ": dict(wq="AWQ4", wk="AWQ4", wv="AWQ4", wo="AWQ4", w1="AWQ4", w3="AWQ4", w2="AWQ4"),
    "INT8": dict(wq="INT8", wk="INT8", wv="INT8", wo="INT8", w1="INT8", w3="INT8", w2="INT8", lm_head="INT8"),
}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_rate(dev: torch.device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves (read + write)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(dev)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(dev)
    return 2 * nbytes * 10 / (time.perf_counter() - t)


def factor_randomly(net: torch.nn.Module, keep: float, dev: torch.device) -> None:
    """Every expert matrix W [out, in] becomes random bf16 factors B [out, r] A [r, in] with `keep` of W's
    parameters (r a multiple of 16), as `levante compress` writes them, except one full expert per layer (compress
    keeps a matrix whole where factors would not save): a layer of two kinds, the mixed fused path."""
    from levante.quant.lowrank import LowRankWeight

    for li, layer in enumerate(net.model.layers):
        for ei, expert in enumerate(layer.ffn.experts):
            for name in ("w1", "w2", "w3"):
                w = getattr(expert, name)
                if ei == li % len(layer.ffn.experts):
                    continue
                n, k = w.out_features, w.in_features
                r = int(keep * n * k / (n + k)) // 16 * 16
                a = torch.randn(r, k, device=dev, dtype=torch.bfloat16) * 0.02
                setattr(expert, name, LowRankWeight(a, torch.randn(n, r, device=dev, dtype=torch.bfloat16) * 0.02))


def active_bytes(net: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step reads: all weights but the embedding table and the unchosen experts."""
    total = 0
    for layer in net.model.layers:
        for mod in (layer.attn, layer.attn_norm, layer.ffn_norm):
            total += sum(b.numel() * b.element_size() for b in mod.buffers())
        ffn = layer.ffn
        total += sum(b.numel() * b.element_size() for b in ffn.gate.buffers())
        experts = sum(b.numel() * b.element_size() for n, b in ffn.named_buffers() if not n.startswith("gate."))
        total += experts * ffn.top_k // ffn.n_experts
    return total + sum(b.numel() * b.element_size() for b in net.lm_head.buffers())


def timed_generation(llm: LLM, prompts: list[list[int]], n: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds after it, new tokens) of one greedy generation of every prompt (the
    token events `LLM.create_completion` streams, each counted, text or not)."""
    dev = llm.model.model.device
    sync(dev)
    t0 = time.perf_counter()
    first, count = None, 0
    for _ in llm._events(prompts, n, SamplingParams.greedy(), None, None, None, False):
        count += 1
        if first is None:
            first = time.perf_counter()
    sync(dev)
    return first - t0, time.perf_counter() - first, count


def run_variant(name: str, loaded: LoadedModel, ids: list[int], n_new: int, limit: float, lines: list[str],
                smoke: bool) -> dict:
    t = time.perf_counter()
    llm = LLM(_loaded=loaded, n_ctx=1024)  # on CUDA its warm-up compiles the kernels ahead, captures batch 1
    start = time.perf_counter() - t
    if smoke:  # CPU: the GPU path itself, under the Triton interpreter (the engine's decoder too)
        llm._decoder = CudaDecoder(llm.model)
        llm.serving_model = lambda: CudaDecoder(llm.model)
    first = timed_generation(llm, [ids], n_new)
    warm = timed_generation(llm, [ids], n_new)
    res = dict(name=name, first=(first[2] - 1) / first[1], warm=(warm[2] - 1) / warm[1], prefill=len(ids) / warm[0],
               bytes=active_bytes(llm.model), llm=llm)
    res["limit"] = limit / res["bytes"]
    ahead = llm._decoder.precompiled if llm._decoder is not None else None
    compiled = f"{ahead['kernels']} in {ahead['seconds']:.1f} s" if ahead else "-"
    lines.append(f"| {name} | {res['bytes'] / 2**30:.2f} GiB | {res['limit']:.0f} | {res['first']:.1f} | "
                 f"{res['warm']:.1f} | {100 * res['first'] / res['limit']:.0f}% | {res['prefill']:.0f} | "
                 f"{start:.1f} s | {compiled} | {first[0]:.2f} s |")
    print(lines[-1], flush=True)
    return res


def ms_per_call(fn, dev: torch.device, reps: int) -> float:
    """Milliseconds per call of fn, called once first (compiles, captures), then `reps` times."""
    with torch.inference_mode():
        fn()
        sync(dev)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(dev)
    return (time.perf_counter() - t) / reps * 1e3


def step_ms(net: torch.nn.Module, float32_inputs: bool, reps: int) -> float:
    """Milliseconds of one batch-1 decode step at position 600 (captured in a graph on CUDA), with the packed
    weights' inputs stored as float32 or as the model's 16-bit dtype."""
    dev = net.model.device
    dec = CudaDecoder(net, float32_inputs=float32_inputs)
    cache = dec.new_cache(1, 1024)
    tok, pos = torch.tensor([[5]], device=dev), torch.tensor([[600]], device=dev)
    return ms_per_call(lambda: dec(tok, pos, cache), dev, reps)


def engine_rate(llm: LLM, prompts: list[list[int]], n: int, batched_prefill: bool = True,
                params: SamplingParams = GREEDY) -> float:
    """Total new tokens per second of the serving engine with one concurrent client per prompt, each sampling by
    `params` (`batched_prefill` False: each new request prefilled alone, as before the engine prefilled them
    together)."""
    from levante.engine import Engine

    clients = len(prompts)
    eng = Engine(llm.serving_model(), llm.tokenizer, n_ctx=llm.n_ctx, max_batch=clients)
    eng.batched_prefill = eng.batched_prefill and batched_prefill
    eng.start()
    try:
        for b in (1, 2, 4, 8, 16, 32):  # warm: Triton compiles, each bucket's graph is captured
            reqs = [eng.submit([7 + i, 8, 9], 3, GREEDY, stop_ids=set()) for i in range(b)]
            for r in reqs:
                list(r)
            if b >= clients:
                break
        counts = [0] * clients

        def client(i: int) -> None:
            counts[i] = sum(1 for _ in eng.submit(prompts[i], n, replace(params, seed=i), stop_ids=set()))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return sum(counts) / (time.perf_counter() - t)
    finally:
        eng.shutdown()


def server_rates(llm: LLM, clients: int, n: int) -> tuple[float, float]:
    """Total streamed tokens per second of levante's OpenAI server over this LLM (uvicorn in this process, its
    engine warmed up at start-up) with `clients` concurrent streaming /v1/completions clients and with one, each
    client getting n greedy tokens (EOS biased out): the issue's server target, HTTP and SSE included. The clients
    run in a process of their own (benchmarks/serve_load.py --url) so that they do not hold this one's GIL."""
    import uvicorn
    from serve_load import free_port  # this script's folder is on sys.path

    from levante.server import create_app

    port = free_port()
    app = create_app(llm, model_alias="bench", max_batch=clients)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.perf_counter() + 300  # the engine's warm-up finds its kernels compiled: seconds
    while not server.started:
        if not thread.is_alive() or time.perf_counter() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start within 300 s (see its log above)")
        time.sleep(0.05)
    try:
        rates = []
        for c in (clients, 1):
            cmd = [sys.executable, str(Path(__file__).with_name("serve_load.py")), "--url", f"http://127.0.0.1:{port}",
                   "--clients", str(c), "--max-tokens", str(n), "--suppress", *map(str, sorted(llm.tokenizer.eos_ids))]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)  # a hang costs device time
            if done.returncode:
                raise RuntimeError(f"the clients failed: {done.stderr[-400:]}")
            rates.append(json.loads(done.stdout.splitlines()[-1])["tok_s"])
        return rates[0], rates[1]
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def sampling_costs(dev: torch.device, rows: int, vocab: int, reps: int, lines: list[str]) -> None:
    """ms per `sample()` call on logits [rows, vocab] on the device (each row its own seeded generator and a history
    of 600 tokens), for greedy rows and two kinds of sampled ones; then the llama.cpp defaults' whole chain under
    sync-debug mode "error" (nothing in it may wait for the device)."""
    logits = torch.randn(rows, vocab, device=dev)
    hist = [torch.randint(0, vocab, (600,)).tolist() for _ in range(rows)]
    gens = [make_generator(i) for i in range(rows)]
    costs = {what: ms_per_call(lambda p=p: sample(logits, [p] * rows, gens, history=hist), dev, reps)
             for what, p in SAMPLERS.items()}
    lines += ["", f"`sample()` of {rows} rows x {vocab}: " + ", ".join(f"{w} {ms:.3f} ms" for w, ms in costs.items())
              + "."]
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            sample(logits, [SAMPLERS["llama.cpp defaults"]] * rows, gens, history=hist)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        lines.append("The llama.cpp defaults' chain (penalties, top-k, top-p, min-p, temperature, seeded draws) ran "
                     "under `set_sync_debug_mode(\"error\")`: no host sync.")


def packed_prefill_ms(llm: LLM, prompts: list[list[int]], reps: int) -> tuple[float, float]:
    """ms of one left-padded prefill of `prompts` (last-token logits) by the LLM's decoder, packed (only the real
    tokens through the projections and the MoE) and padded (CudaDecoder.pack_prompts off), each warmed up first."""
    from levante.generate import _prefill_positions

    dec = llm._decoder
    dev = llm.model.model.device
    tokens, positions = _prefill_positions(prompts, max(map(len, prompts)))
    tokens, positions = tokens.to(dev), positions.to(dev)
    cache = dec.new_cache(len(prompts), tokens.shape[1] + 1)
    out = []
    try:
        for pack in (True, False):
            dec.pack_prompts = pack
            out.append(ms_per_call(lambda: dec(tokens, positions, cache, last_only=True), dev, reps))
    finally:
        dec.pack_prompts = True
    return out[0], out[1]


def profile_step(llm: LLM, lines: list[str]) -> None:
    """The profile of one eager decode step (batch 1), and a captured step under sync-debug mode "error"."""
    dec = CudaDecoder(llm.model, use_graphs=False)
    cache = dec.new_cache(1, 1024)
    dev = llm.model.model.device
    tok = torch.tensor([[5]], device=dev)
    pos = torch.tensor([[600]], device=dev)
    with torch.inference_mode():
        for _ in range(3):
            dec(tok, pos, cache)
        sync(dev)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            dec(tok, pos, cache)
            sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    lines += ["", "Profile of one eager decode step (batch 1; the captured graph replays the same kernels):", "",
              "```", prof.key_averages().table(sort_by=key, row_limit=14), "```"]
    if dev.type == "cuda":
        graphed = CudaDecoder(llm.model)
        cache = graphed.new_cache(1, 1024)
        with torch.inference_mode():
            graphed(tok, pos, cache)  # captures
            sync(dev)
            torch.cuda.set_sync_debug_mode("error")
            try:
                t = time.perf_counter()
                for _ in range(20):
                    graphed(tok, pos, cache)
                torch.cuda.set_sync_debug_mode("default")
                sync(dev)
                step = (time.perf_counter() - t) / 20
            finally:
                torch.cuda.set_sync_debug_mode("default")
        lines.append(f"\nA captured decode step: {step * 1e3:.3f} ms (20 replays), no host sync inside "
                     "(`set_sync_debug_mode(\"error\")` passed).")


def check_kernels(dev: torch.device, shape: tuple[int, int], lines: list[str]) -> None:
    """Each packed format at the experts' shape, by the GEMV (one row; programs of 4 and 8 rows) and the tiled
    kernel (twelve rows): vs x @ W^T of the dequantized weight in float32 (bf16 x)."""
    n, k = shape
    worst = []
    for qtype in ("Q4_K", "Q6_K", "Q8_0", "Q5_K", "Q4_0", "AWQ4", "INT8"):
        w = random_packed(n, k, qtype, dev)
        for m in (1, 3, 8, 12):
            x = torch.randn(m, k, device=dev).bfloat16()
            ref = x.float() @ w.dequantize().T
            err = ((w.matmul(x).float() - ref).abs().max() / ref.abs().max()).item()
            worst.append(f"{qtype}/{m} {err:.1e}")
            assert err < 1.5e-2, (qtype, m, err)  # bf16 rounding of W (tiled) and of y
    lines.append(f"- packed kernels at [{n}, {k}], bf16 activations, 1 / 3 / 8 / 12 rows (GEMV of 1, 4, 8 rows; "
                 "tiled), max error / max |y|: " + ", ".join(worst))


def per_call(fn, dev: torch.device, reps: int) -> float:
    """Seconds per call of fn, from a CUDA graph of `reps` calls (no launch overhead in the time); plain calls on
    the CPU."""
    fn()
    sync(dev)
    if dev.type != "cuda":
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    sync(dev)
    t = time.perf_counter()
    g.replay()
    sync(dev)
    return (time.perf_counter() - t) / reps


def kernel_sweep(dev: torch.device, spec: dict, rate: float, lines: list[str]) -> None:
    """Batch-1 weight reads at the model's shapes, kernel by kernel: the experts' GEMMs of one token (top-2 pairs)
    and the packed dense matmuls, by the GEMV and by the tiled kernel in a few launch configurations, as the
    fraction of the copy rate each reaches (bytes it must read / time). The defaults are marked *."""
    from levante.cuda.moe import ExpertStack, Routing, align_by_expert, route
    from levante.cuda.triton_matmul import (
        GEMV,
        GEMV_NEAR,
        GEMV_WIDE,
        Launch,
        dot_launch,
        gemv_launch,
        gemv_unit,
        packed_matmul,
    )
    from levante.cuda.triton_moe import moe_matmul

    d, f, n_exp = spec["hidden_size"], spec["intermediate_size"], spec["num_local_experts"]
    reps = 20 if dev.type == "cuda" else 1
    # the one-row GEMV's slices loaded ahead (Launch.ahead): GEMV's and GEMV_WIDE's defaults against the others
    gemvs = [GEMV, GEMV_NEAR, GEMV_WIDE, replace(GEMV, ahead=0), replace(GEMV_WIDE, ahead=1),
             Launch(1, 32, 128, 4, 3, gemv=True), Launch(1, 16, 512, 4, 4, gemv=True),
             Launch(1, 64, 128, 8, 3, gemv=True)]
    lines += ["", "Batch-1 kernels (one token; experts: its 2 pairs), fraction of the copy rate (x bf16; 'x f32': the "
              "same values stored as float32, as the decoder passes them to packed weights; 'ahead': the slices a "
              "one-row GEMV loads before it multiplies one):", "",
              "| weight | [N, K] | kernel (bm, bn, bk, warps, stages) | us | read GB/s | / copy rate |",
              "|---|---|---|---|---|---|"]

    todo: list[tuple] = []  # the calls to time, each with its row of `lines`: timed once all are compiled

    def report(what: str, shape: tuple[int, int], launch: Launch, default: bool, nbytes: int, fn) -> None:
        kind = "GEMV" if launch.gemv else "tiled"
        mark = " *" if default else ""
        ahead = f", ahead {launch.ahead}" if launch.gemv else ""
        cfg = f"{kind}{mark} ({launch.bm}, {launch.bn}, {launch.bk}, {launch.warps}, {launch.stages}{ahead})"
        todo.append((len(lines), f"| {what} | {list(shape)} | {cfg} |", nbytes, fn))
        lines.append(f"| {what} | {list(shape)} | {cfg} | not timed | | |")

    ids = torch.tensor([[3, 5]], device=dev)
    for fmt in ("bf16", "Q4_K", "Q6_K", "Q8_0", "AWQ4"):
        full = fmt in ("bf16", "Q4_K")  # every configuration for these two; the defaults for the others
        # the default tile, then another: for packed weights vLLM's float one, which spills registers on sm_90
        tiled = [dot_launch(1, dense=fmt == "bf16"),
                 Launch(16, 64, 128, 4, 3) if fmt == "bf16" else Launch(16, 128, 128, 4, 5)]
        for n, k in ((2 * f, d), (d, f)):
            if fmt == "bf16":
                stack = ExpertStack([DenseWeight(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02)
                                     for _ in range(n_exp)])
            else:
                stack = ExpertStack([random_packed(n, k, fmt, dev) for _ in range(n_exp)])
            x = torch.randn(2, k, device=dev).bfloat16()
            c = torch.empty(2, n, device=dev, dtype=torch.bfloat16)
            nbytes = 2 * stack.nbytes // n_exp
            ours = gemv_launch(1, 2, n, 32 if fmt == "bf16" else stack.g, k)  # the default GEMV for n rows first
            mine = [ours] + [g for g in gemvs if g != ours]
            for launch in (mine if full else mine[:1]) + (tiled if full else tiled[:1]):
                if launch.gemv:
                    routing = Routing(2, launch, experts=ids.reshape(-1).to(torch.int32))
                else:
                    routing = align_by_expert(ids, n_exp, launch)
                default = launch == (tiled[0] if fmt == "bf16" else ours)
                report(f"experts {fmt}", (n, k), launch, default, nbytes,
                       partial(moe_matmul, x, c, stack, routing, 1, launch=launch))
                if default and launch.gemv:  # the decoder's float32 inputs (the values of bf16 ones)
                    report(f"experts {fmt}, x f32", (n, k), launch, default, nbytes,
                           partial(moe_matmul, x.float(), c, stack, routing, 1, launch=launch))
    for fmt, (n, k) in (("Q4_K", (d, d)), ("Q4_K", (d + 2 * d // 4, d)), ("Q6_K", (spec["vocab_size"], d))):
        w = random_packed(n, k, fmt, dev)
        x = torch.randn(1, k, device=dev).bfloat16()
        nbytes = sum(b.numel() * b.element_size() for b in w.buffers())
        ours = gemv_launch(1, 2, n, w.g, k)
        for launch in dict.fromkeys((ours, GEMV, GEMV_NEAR, replace(GEMV, ahead=0), dot_launch(1, dense=False))):
            report(f"dense {fmt}", (n, k), launch, launch == ours, nbytes, partial(packed_matmul, x, w, launch))
        report(f"dense {fmt}, x f32", (n, k), ours, True, nbytes,
               partial(packed_matmul, x.float(), w, ours, torch.bfloat16))

    lines += ["", "Batch-2 and -4 kernels (dense weights, the decoder's float32 inputs): the GEMV of 2 and 4 rows "
              "loading the next slice ahead (the default on weights of few programs) or not", "",
              "| weight | [N, K] | kernel (bm, bn, bk, warps, stages) | us | read GB/s | / copy rate |",
              "|---|---|---|---|---|---|"]
    for fmt in ("Q4_K", "Q6_K"):
        w = random_packed(d, d, fmt, dev)
        nbytes = sum(b.numel() * b.element_size() for b in w.buffers())
        for m in (2, 4):
            x = torch.randn(m, d, device=dev)
            ours = gemv_launch(m, gemv_unit(w.bits, d), d, w.g, d)
            for launch in dict.fromkeys((ours, replace(ours, ahead=0), replace(ours, ahead=1))):
                report(f"dense {fmt}, {m} rows", (d, d), launch, launch == ours, nbytes,
                       partial(packed_matmul, x, w, launch, torch.bfloat16))

    lines += ["", "Batch-8 kernels (8 tokens; experts: their 16 pairs, sorted), the same weights: the GEMV of 8 rows "
              "(dense) or of blocks of 2 pairs (experts) against the tiled kernel; bytes read: every weight once", "",
              "| weight | [N, K] | kernel (bm, bn, bk, warps, stages) | us | read GB/s | / copy rate |",
              "|---|---|---|---|---|---|"]
    ids8 = torch.stack([torch.randperm(n_exp, device=dev)[:2] for _ in range(8)])
    for fmt in ("Q4_K", "Q6_K", "Q8_0"):
        w = random_packed(d, d, fmt, dev)
        x = torch.randn(8, d, device=dev).bfloat16()
        nbytes = sum(b.numel() * b.element_size() for b in w.buffers())
        for launch in (gemv_launch(8, gemv_unit(w.bits, d)), dot_launch(8, dense=False)):
            report(f"dense {fmt}", (d, d), launch, launch.gemv, nbytes, partial(packed_matmul, x, w, launch))
        launch = gemv_launch(8, gemv_unit(w.bits, d))
        report(f"dense {fmt}, x f32", (d, d), launch, True, nbytes,
               partial(packed_matmul, x.float(), w, launch, torch.bfloat16))
        stack = ExpertStack([random_packed(2 * f, d, fmt, dev) for _ in range(n_exp)])
        x = torch.randn(8, d, device=dev).bfloat16()
        c = torch.empty(16, 2 * f, device=dev, dtype=torch.bfloat16)
        used = len(set(ids8.reshape(-1).tolist()))
        for routing in (route(ids8, n_exp, packed=True), align_by_expert(ids8, n_exp, dot_launch(8, dense=False))):
            launch = (gemv_launch(routing.launch.bm, gemv_unit(w.bits, d), 2 * f, w.g, d,
                                  blocks=routing.block_expert.numel()) if routing.launch.gemv else routing.launch)
            report(f"experts {fmt}", (2 * f, d), launch, routing.launch.gemv, used * stack.nbytes // n_exp,
                   partial(moe_matmul, x, c, stack, routing, 2))
            if routing.launch.gemv:
                report(f"experts {fmt}, x f32", (2 * f, d), launch, True, used * stack.nbytes // n_exp,
                       partial(moe_matmul, x.float(), c, stack, routing, 2))

    if dev.type == "cuda":  # the configurations' kernels compiled in parallel (levante.cuda.precompile)
        with recorded_launches(run=False) as records:
            for *_, fn in todo:
                fn()
        done = compile_launches(records, *device_target(dev))  # one per kernel
        print(f"kernel sweep: {done['kernels']} kernels compiled in {done['seconds']:.1f} s", flush=True)
    for i, head, nbytes, fn in todo:
        t = per_call(fn, dev, reps)
        lines[i] = f"{head} {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | {nbytes / t / rate:.2f} |"
        print(lines[i], flush=True)


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="a SentencePiece tokenizer.model for the random models")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    args = ap.parse_args()
    began = time.perf_counter()
    dev = torch.device("cpu" if args.smoke else "cuda")
    spec = SMOKE if args.smoke else MIXTRAL_4L
    n_prompt, n_new, n_batch_new, wide = (24, 6, 4, 4) if args.smoke else (512, 128, 64, 32)
    work = Path(tempfile.mkdtemp())
    lines = [f"# levante on {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu (smoke)'} "
             f"(torch {torch.__version__})", ""]
    out_file = None if args.smoke else Path(args.out) / "cuda_bench.md"

    took: list[str] = []  # each section's wall time, for planning the next run's time on the device

    def save() -> None:  # after every section: a failure later (or the device's time running out) keeps the rest
        timing = ["", f"Sections' wall times (since start {time.perf_counter() - began:.0f} s): " + ", ".join(took)]
        print(timing[-1], flush=True)
        if out_file is not None:
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text("\n".join(lines + timing) + "\n")

    def attempt(name: str, fn):
        """fn(), or None with the failure written into the results (one broken section does not lose the run)."""
        t = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            lines.append(f"- {name} FAILED: {type(e).__name__}: {str(e)[:300]}")
            return None
        finally:
            took.append(f"{name} {time.perf_counter() - t:.0f} s")
            save()

    # correctness: a tiny model's greedy tokens on the GPU path equal the CPU model's; the kernels at full shape
    def tiny_check() -> None:
        tiny = transformers.MixtralForCausalLM(transformers.MixtralConfig(**dict(SMOKE, hidden_size=64,
                                                                                   intermediate_size=96))).eval()
        tiny.save_pretrained(work / "tiny")
        shutil.copy(args.tokenizer, work / "tiny" / "tokenizer.model")
        want = LLM(str(work / "tiny"), n_ctx=128)("Hello there", max_tokens=16, temperature=0)["choices"][0]["text"]
        gpu = LLM(str(work / "tiny"), n_ctx=128, device=str(dev), dtype="float32")
        if args.smoke:
            gpu._decoder = CudaDecoder(gpu.model)
        got = gpu("Hello there", max_tokens=16, temperature=0)["choices"][0]["text"]
        lines.append(f"- tiny float32 Mixtral, 16 greedy tokens on the GPU path == CPU: {got == want}")

    def tiny_bf16_check() -> None:  # the fused kernels' bf16 rounding on the GPU: the decoder's logits vs the CPU's
        cpu = load(work / "tiny", dtype="bfloat16").model
        gpu = load(work / "tiny", dtype="bfloat16", device=str(dev)).model
        fuse_moe(gpu)  # done by the load on CUDA; the smoke run's CPU load leaves the modules
        ids = torch.randint(3, 1000, (1, 40))
        with torch.inference_mode():
            want = cpu(ids).float()
            dec = CudaDecoder(gpu)
            cache = dec.new_cache(1, 64)
            pos = torch.arange(40)[None]
            got = torch.cat([dec(ids[:, :39].to(dev), pos[:, :39].to(dev), cache).cpu(),
                             dec(ids[:, 39:].to(dev), pos[:, 39:].to(dev), cache).cpu()], dim=1).float()
        err = ((got - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        lines.append(f"- tiny bf16 Mixtral, decoder (prefill 39 + 1 decode step) vs the CPU model: max error / max "
                     f"|logit| {err:.1e}, same argmax at {100 * agree:.0f}% of 40 positions")

    attempt("tiny model check", tiny_check)
    attempt("tiny bf16 check", tiny_bf16_check)
    attempt("kernel check", lambda: check_kernels(dev, (spec["intermediate_size"], spec["hidden_size"]), lines))

    # the bf16 model, saved once and loaded by both engines (nothing else can run without it)
    torch.manual_seed(0)
    with torch.device(dev):
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**spec))
    hf = hf.to(torch.bfloat16).eval()
    hf.save_pretrained(work / "m")
    shutil.copy(args.tokenizer, work / "m" / "tokenizer.model")
    ids = torch.randint(3, spec["vocab_size"], (n_prompt,)).tolist()
    rate = copy_rate(dev, (1 << 30) if not args.smoke else (1 << 24))
    lines += ["", f"Device copy rate: {rate / 1e12:.2f} TB/s (read + write).", "",
              "| weights | active bytes / token | HBM limit tok/s | first gen decode tok/s | warm decode tok/s | "
              "first / limit | prefill tok/s | LLM start-up | kernels compiled ahead | first gen's first token |",
              "|---|---|---|---|---|---|---|---|---|---|"]

    def bf16_variant() -> dict:
        loaded = load(work / "m", dtype="bfloat16", device=str(dev))
        fuse_moe(loaded.model)  # done by the load on CUDA; the smoke run's CPU load leaves the modules
        return run_variant("bf16", loaded, ids, n_new, rate, lines, args.smoke)

    def quantized_variant(scheme: str, roles: dict[str, str]) -> dict:
        if args.smoke:  # the interpreter is slow on a 32000-row head: the smoke run keeps it in bf16
            roles = {k: v for k, v in roles.items() if k != "lm_head"}
        loaded = load(work / "m", dtype="bfloat16")
        quantize_randomly(loaded.model, roles, dev)
        loaded.model.to(dev)
        fuse_moe(loaded.model)
        r = run_variant(scheme, loaded, ids, n_new, rate, lines, args.smoke)
        llm = r.pop("llm")
        if scheme in ("Q4_K_M", "Q8_0"):  # the decoder's float32 GEMV inputs against bf16 ones, step by step
            reps = 50 if dev.type == "cuda" else 1
            r["step_f32"], r["step_bf16"] = (step_ms(llm.model, f, reps) for f in (True, False))
        return r

    def low_rank_variant() -> dict:
        loaded = load(work / "m", dtype="bfloat16")
        factor_randomly(loaded.model, 0.5, dev)
        loaded.model.to(dev)
        fuse_moe(loaded.model)
        r = run_variant("low-rank", loaded, ids, n_new, rate, lines, args.smoke)
        r.pop("llm")
        return r

    res = {"bf16": attempt("bf16", bf16_variant)}
    for scheme, roles in SCHEMES.items():
        res[scheme] = attempt(scheme, lambda scheme=scheme, roles=roles: quantized_variant(scheme, roles))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    res["low-rank"] = attempt("low-rank", low_rank_variant)

    def transformers_peer() -> tuple[float, float]:  # eager, warm, the same bf16 weights: prefill and decode
        x = torch.tensor([ids], device=dev)
        with torch.inference_mode():
            for _ in range(2):
                sync(dev)
                t = time.perf_counter()
                hf(x)
                sync(dev)
                prefill = n_prompt / (time.perf_counter() - t)
            for _ in range(2):
                sync(dev)
                t = time.perf_counter()
                out = hf.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
                sync(dev)
                total = time.perf_counter() - t
        return prefill, (out.shape[1] - n_prompt - 1) / (total - n_prompt / prefill)

    peer = attempt("transformers", transformers_peer)
    bf = res["bf16"]
    llm = bf.pop("llm") if bf is not None else None

    def batch_rates() -> tuple[float, float]:
        """Total decode tok/s of `wide` prompts in one call: the LLM's first such call (its start-up compiled every
        bucket's kernels; the call allocates the batch's cache and captures its bucket's graph) and the next."""
        batch = [torch.randint(3, spec["vocab_size"], (n_prompt,)).tolist() for _ in range(wide)]
        rates = []
        for _ in range(2):
            _, after, count = timed_generation(llm, batch, n_batch_new)
            rates.append((count - wide) / after)
        return rates[0], rates[1]

    def engine_rates() -> tuple[float, ...]:
        short = [torch.randint(3, spec["vocab_size"], (128,)).tolist() for _ in range(wide)]
        return (engine_rate(llm, short[:1], n_batch_new), engine_rate(llm, short, n_batch_new),
                engine_rate(llm, short, n_batch_new, batched_prefill=False),
                *(engine_rate(llm, short, n_batch_new, params=p) for w, p in SAMPLERS.items() if w != "greedy"))

    # prompts of lengths spread evenly up to n_prompt: packed, the projections and MoE see ~half the padded tokens
    mixed = [torch.randint(3, spec["vocab_size"], (max(1, n_prompt * (i + 1) // wide),)).tolist()
             for i in range(wide)]
    wide_rates = attempt("batch", batch_rates) if llm is not None else None
    engine = attempt("engine", engine_rates) if llm is not None else None
    served = attempt("server", lambda: server_rates(llm, wide, n_batch_new)) if llm is not None else None
    attempt("sampling", lambda: sampling_costs(dev, wide, spec["vocab_size"], 20 if dev.type == "cuda" else 1,
                                               lines))
    packing = attempt("packed prefill", lambda: packed_prefill_ms(llm, mixed, 5 if dev.type == "cuda" else 1)
                      ) if llm is not None else None

    def row(what: str, a: float | None, b: float | None, goal: str, unit: str = "tok/s", x: str = "x") -> str:
        if a is None or b is None:
            return f"| {what} | n/a | n/a | {goal} |"
        return f"| {what} | {a:.1f} / {b:.1f} {unit} | {a / b:.2f}{x} | {goal} |"

    def get(r: dict | None, key: str) -> float | None:
        return None if r is None else r[key]

    lines += ["", "| target | measured | ratio | goal |", "|---|---|---|---|",
              row("bf16 batch-1 decode (first generation) vs HBM limit", get(bf, "first"), get(bf, "limit"),
                  ">= 0.70", x=""),
              row("bf16 decode vs transformers eager (warm)", get(bf, "first"), peer and peer[1], ">= 2x"),
              row(f"batch {wide} x {n_batch_new} total vs batch 1 (warm)", wide_rates and wide_rates[1],
                  get(bf, "warm"), ">= 8x"),
              row(f"batch {wide} x {n_batch_new}: first batched call vs warm", wide_rates and wide_rates[0],
                  wide_rates and wide_rates[1], "~1x")]
    for scheme, goal in (("Q4_K_M", 2.5), ("Q8_0", 1.6), ("AWQ", 2.5), ("INT8", 1.6)):
        lines.append(row(f"{scheme} decode vs bf16 (first generation)", get(res[scheme], "first"), get(bf, "first"),
                         f">= {goal}x"))
        steps = res[scheme] or {}
        if "step_f32" in steps:
            lines.append(row(f"{scheme} decode step, bf16 / float32 GEMV inputs (float32: the default)",
                             steps["step_bf16"], steps["step_f32"], "> 1x", "ms"))
    lr, goal = res["low-rank"], None
    if lr is not None and bf is not None:
        goal = f"{bf['bytes'] / lr['bytes']:.2f}x (bytes)"
    lines.append(row("low-rank (half the expert parameters, 1 of 8 experts full) decode vs bf16", get(lr, "first"),
                     get(bf, "first"), goal or "bytes ratio"))
    lines += [row(f"prefill {n_prompt} vs transformers", get(bf, "prefill"), peer and peer[0], ">= 1x"),
              row(f"engine, {wide} concurrent clients vs 1", engine and engine[1], engine and engine[0], ">= 10x"),
              row(f"server (HTTP, streamed), {wide} concurrent clients vs 1", served and served[0],
                  served and served[1], ">= 10x"),
              row(f"engine, {wide} clients of 128 tokens: new requests prefilled together vs one by one",
                  engine and engine[1], engine and engine[2], "> 1x"),
              *(row(f"engine, {wide} clients sampling with the {w} vs greedy", engine and engine[3 + i],
                    engine and engine[1], ">= 0.9x") for i, w in enumerate(list(SAMPLERS)[1:])),
              row(f"prefill of {wide} prompts of {len(mixed[0])}..{len(mixed[-1])} tokens: padded vs packed "
                  f"({sum(map(len, mixed))} of {wide * len(mixed[-1])} tokens real)", packing and packing[1],
                  packing and packing[0], "> 1x", "ms")]
    save()
    if llm is not None:
        attempt("profile", lambda: profile_step(llm, lines))
        del llm
    attempt("kernel sweep", lambda: kernel_sweep(dev, spec, rate, lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
