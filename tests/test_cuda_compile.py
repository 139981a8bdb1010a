"""Every Triton kernel levante launches compiles for the H200 (sm_90), with the constexprs and launch options a GPU
run uses, and fits it: shared memory within a block's limit, no register spills; by the Triton the tests import and
by the GPU machine's own (Triton 3.6: what it runs; its code differs, e.g. the router's float32 gate tile spilled
there only). No GPU needed (tests/triton_aot.py: launches recorded, not all of them run, and compiled in a
subprocess). The SASS counts (instructions per weight) are checked on the first's code.

Workloads: the decoder on one-layer models with Mixtral-8x7B's and SmolLM2-135M's hidden sizes and heads (the sizes
the fused kernels' blocks follow), bf16 (and float16, an F16 checkpoint's dtype on a GPU; float32, an explicit
dtype="float32"), through prefill chunks of every tile tier, a batch of 3 rows' prefill (padded and packed) and
decode steps of 1 and 3 rows (recorded by levante.cuda.precompile's dry run on the meta device); then every packed
format's matmul and grouped-expert kernels at each tier (one row: the GEMV; recorded without running them: nothing
reads their outputs); last, a Q4_K_M Mixtral-8x7B layer at its real sizes (decode buckets 1-8
and the warm-up's prefills), by levante.cuda.precompile's dry run on the meta device, where it launches what the
small workloads do not compile the same way."""

from __future__ import annotations

import pytest
import torch
from fixtures import Q4_K_M, mixtral_8x7b_layer
from triton_aot import GPU_TRITON, GPU_TRITON_DIR, H200, compile_records, recording

from levante.cuda.triton_matmul import Launch

# rows: the GEMV programs of 1, 2, 4 and 8 rows (experts: a pair each, blocks of 2, 4, 8), then each of
# dot_launch's configurations for packed weights
TIERS = (1, 2, 3, 5, 14, 20, 60, 140)


SHAPES = {  # one layer each, at the sizes the fused kernels' blocks follow
    "mixtral_8x2": dict(hidden_size=4096, intermediate_size=128, num_attention_heads=32, num_key_value_heads=8,
                        num_local_experts=8, num_experts_per_tok=2),  # Mixtral-8x7B
    "llama_tied": dict(hidden_size=576, intermediate_size=64, num_attention_heads=9, num_key_value_heads=3),  # SmolLM2
}


def _decoder_launches(tmp_path, kind: str, dtype: str) -> list[dict]:
    from fixtures import hf_model, save_hf

    from levante.cuda import CudaDecoder, fuse_moe
    from levante.cuda.precompile import decoder_launches
    from levante.loader import load

    hf = hf_model(kind, vocab_size=256, num_hidden_layers=1, max_position_embeddings=1024, **SHAPES[kind])
    net = load(save_hf(hf, tmp_path / f"{kind}-{dtype}"), dtype=dtype).model
    fuse_moe(net)
    dec = CudaDecoder(net)
    # one-row prefills of attention's two query tiles and MoE's five tile tiers, a prefill of 3 rows (and packed: 7
    # of their 12 tokens real), decode steps of 1 and 3 rows (bucket 4): levante.cuda.precompile's dry run on the
    # meta device (what the real steps launch: test_cuda_precompile)
    return decoder_launches(dec, (1, 4), 1024, dec.model.dtype, prefill=(12, 20, 60, 100, 140, (3, 4), (3, 4, 7)))


def _float32_store_launches() -> list[dict]:
    """The small ops of a bf16 model's decode step whose outputs only packed weights read, stored as float32 (the
    decoder's `packed_readers`), at Mixtral-8x7B's sizes: the norms (alone, after a residual, after the experts'
    top-2 outputs), the router on float32 x, the experts' activation, the attention's output (decode and a chunk)."""
    from levante.cuda.triton_attention import cache_attention
    from levante.cuda.triton_fused import add_rms_norm, router, silu_mul

    bf16, f32 = torch.bfloat16, torch.float32
    x, w = torch.randn(1, 4096).to(bf16), torch.ones(4096, dtype=bf16)
    with recording(run=False) as records:  # recorded, not run: nothing reads their outputs
        for delta in (None, torch.randn(1, 4096).to(bf16), torch.randn(1, 2, 4096).to(bf16)):
            add_rms_norm(x, delta, w, 1e-5, f32)
        router(torch.randn(1, 4096), torch.randn(8, 4096).to(bf16), 2, bf16)
        silu_mul(torch.randn(2, 14336).to(bf16), torch.randn(2, 14336).to(bf16), f32)
        kc, vc = torch.randn(1, 8, 64, 128).to(bf16), torch.randn(1, 8, 64, 128).to(bf16)
        for t in (1, 3):
            cache_attention(torch.randn(1, 32, t, 128).to(bf16), kc, vc, torch.tensor([40], dtype=torch.int32),
                            store=f32)
    return records


def _packed_launches() -> list[dict]:
    from dataclasses import replace

    from test_cuda_moe import _packed

    from levante.cuda import PackedWeight
    from levante.cuda.moe import ExpertStack, route
    from levante.cuda.packed import LAYOUTS
    from levante.cuda.triton_matmul import GEMV, GEMV_NEAR, WIDE_N, gemv_launch, gemv_unit, packed_matmul
    from levante.cuda.triton_moe import moe_matmul
    from levante.quant.base import DenseWeight

    def weight(qtype: str, seed: int) -> PackedWeight:
        g = torch.Generator().manual_seed(seed)
        if qtype == "AWQ4":
            return PackedWeight.from_awq(torch.randint(0, 16, (32, 256), generator=g, dtype=torch.uint8),
                                         torch.randint(0, 16, (32, 2), generator=g, dtype=torch.uint8),
                                         torch.rand(32, 2, generator=g).half() * 1e-2, 128)
        if qtype == "INT8":
            return PackedWeight.from_int8(torch.randint(-127, 128, (32, 256), generator=g, dtype=torch.int8),
                                          torch.rand(32, generator=g) * 1e-2)
        return _packed(32, 256, qtype, seed)

    # (format, rows, x's dtype, the output's)
    cases = [(q, m, torch.bfloat16, torch.bfloat16) for q in (*LAYOUTS, "AWQ4", "INT8") for m in TIERS]
    cases += [("Q4_K", m, dt, dt) for m in TIERS for dt in (torch.float16, torch.float32)]
    # the decoder's GEMV inputs of a bf16 model: float32, holding bf16 values (one row, and eight)
    cases += [(q, m, torch.float32, torch.bfloat16) for q in (*LAYOUTS, "AWQ4", "INT8") for m in (1, 5)]
    # recorded, not run (the launches are those of running them, a 30th of the time: nothing reads the outputs)
    with recording(run=False) as records:
        for qtype, m, dt, out in cases:
            w = weight(qtype, 0)
            packed_matmul(torch.randn(m, 256).to(dt), w, out_dtype=out)
            # the GEMV as rows of Mixtral's 4096 values run it (one row: loading slices ahead, `loads_ahead`)
            real = gemv_launch(m, gemv_unit(w.bits, 256), 0, w.g, 4096) if m == 1 else None
            if m == 1:  # also by the slices of a weight of WIDE_N rows or more; the benchmark's others for Q4_K
                launches = [real, gemv_launch(1, gemv_unit(w.bits, 256), WIDE_N, w.g, 4096)]
                if qtype == "Q4_K":
                    launches += [replace(GEMV, ahead=0), GEMV_NEAR]
                for launch in launches:
                    packed_matmul(torch.randn(1, 256).to(dt), w, launch, out)
            stack = ExpertStack([weight(qtype, s) for s in range(4)])
            ids = torch.stack([torch.randperm(4)[:2] for _ in range(m)])
            routing = route(ids, 4, packed=True, wide=out == torch.float32)
            x = torch.randn(m, 256).to(dt)
            h = torch.empty(2 * m, 32, dtype=out)
            down = ExpertStack([weight(qtype, 9 + s) for s in range(4)])  # times the routing weights
            # the experts' kernel runs the same GEMV: as Mixtral's K runs it for one format of each loading ahead
            for launch in dict.fromkeys((None, real if qtype in ("Q4_K", "Q6_K") else None)):
                moe_matmul(x, h, stack, routing, 2, launch=launch)  # gate / up: each token's row twice
                moe_matmul(torch.randn(2 * m, 256).to(dt), h, down, routing, 1, torch.rand(2 * m), launch)
        # float experts by the one-row GEMV (LEVANTE_GEMV=all; the benchmark's rows), loading none and 3 slices ahead
        floats = ExpertStack([DenseWeight(torch.randn(32, 256).bfloat16()) for _ in range(4)])
        routing = route(torch.tensor([[1, 2]]), 4, packed=True)
        for launch in (replace(GEMV, ahead=0), GEMV):
            moe_matmul(torch.randn(1, 256), torch.empty(2, 32), floats, routing, 2, launch=launch)
        # a batch's 2 or 3 rows of Mixtral's 4096 values (the decoder's float32 inputs): programs of 2 and 4 rows
        # that load a slice ahead
        for qtype in ("Q4_K", "Q6_K"):
            w = weight(qtype, 0)
            for m in (2, 3):
                launch = gemv_launch(m, gemv_unit(w.bits, 256), 0, w.g, 4096)
                assert launch.ahead == 1
                packed_matmul(torch.randn(m, 256), w, launch, torch.bfloat16)
    return records


def _full_size_launches(known: list[dict]) -> list[dict]:
    """A Q4_K_M Mixtral-8x7B's launches at its real sizes (one layer; the head Q6_K, the router bf16): the decode
    steps of buckets 1-8 and the prefills a GPU decoder's warm-up compiles, recorded by levante.cuda.precompile's
    dry run on the meta device (nothing runs); those Triton would compile as one of `known` left out."""
    from levante.cuda import CudaDecoder
    from levante.cuda.precompile import compile_key, decoder_launches

    seen = {compile_key(r) for r in known}
    return [r for r in decoder_launches(CudaDecoder(mixtral_8x7b_layer(Q4_K_M)), (1, 2, 4, 8), 4096, torch.bfloat16)
            if compile_key(r) not in seen]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("records")
    # float16: an F16 checkpoint's dtype on a GPU (bfloat16 for the others); float32: an explicit dtype="float32"
    decoders = [("mixtral_8x2", "bfloat16"), ("llama_tied", "bfloat16"), ("llama_tied", "float16"),
                ("mixtral_8x2", "float32")]
    records = [r for kind, dtype in decoders for r in _decoder_launches(tmp, kind, dtype)]
    records += _float32_store_launches() + _packed_launches()
    full = _full_size_launches(records)
    assert len(full) > 10  # sizes the small workloads do not reach (a 14336-row GEMV's programs, 32 query heads' tiles)
    return records + full


@pytest.fixture(scope="module")
def report(records, tmp_path_factory) -> list[dict]:
    """Compiled by the installed Triton, with each kernel's SASS."""
    return compile_records(records, tmp_path_factory.mktemp("aot"))[1]


@pytest.fixture(scope="module")
def gpu_report(records, tmp_path_factory) -> list[dict]:
    """Compiled by the GPU machine's Triton: registers and spills, and the SASS of the GEMVs on float32 x (what the
    decoder gives packed weights on a GPU, `packed_readers`)."""
    version, compiled = compile_records(records, tmp_path_factory.mktemp("aot-gpu"), GPU_TRITON_DIR,
                                        sass=lambda r: _is_gemv(r) and _x_dtype(r) == "float32")
    assert version == GPU_TRITON
    return compiled


REPORTS = {"installed": "report", "gpu_machine": "gpu_report"}


def _x_dtype(r: dict) -> str:
    return next(a["dtype"] for a in r["args"] if isinstance(a, dict))


def _is_gemv(r: dict) -> bool:
    return r["kernel"] in ("_packed_gemv_kernel", "_moe_gemv_kernel")


def _name(r: dict) -> str:
    kw = r["kwargs"]
    tile = Launch(kw.get("BM", kw.get("R", 1)), kw.get("BN", 0), kw.get("BK", 0), kw.get("num_warps", 4),
                  kw.get("num_stages", 3), gemv="R" in kw, ahead=kw.get("AHEAD", 0))
    dtype = _x_dtype(r)
    fmt = f" bits {kw['BITS']} g {kw['G']}" if "BITS" in kw else ""
    return f"{r['kernel']} {dtype}{fmt} {tile}"


@pytest.mark.parametrize("triton", REPORTS)
def test_every_kernel_compiles_for_the_h200(triton, request):
    report = request.getfixturevalue(REPORTS[triton])
    kernels = {r["kernel"] for r in report}
    assert {"_packed_gemv_kernel", "_packed_matmul_kernel", "_moe_gemv_kernel", "_moe_kernel", "_attention_kernel",
            "_decode_split_kernel", "_decode_merge_kernel", "_add_rms_norm_kernel", "_rope_cache_kernel",
            "_silu_mul_kernel", "_router_kernel"} <= kernels
    failed = [f"{_name(r)}: {r['error'][:300]}" for r in report if "error" in r]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("triton", REPORTS)
def test_launches_fit_the_h200(triton, request):
    """No launch spills registers, and every launch runs with its own pipeline stages (levante.cuda.triton_matmul
    .run would retry with fewer), whatever the activations' dtype."""
    report = request.getfixturevalue(REPORTS[triton])
    rows = [r for r in report if "error" not in r]
    too_big = [_name(r) for r in rows if r["shared"] > H200["max_shared"]]
    assert not too_big, too_big
    for r in rows:
        print(f"{_name(r)}: stages {r['stages']}, shared {r['shared']}, regs {r['regs']}, spill {r['spill']}")
    dtypes = [_x_dtype(r) for r in rows]
    assert min(dtypes.count(d) for d in ("bfloat16", "float16", "float32")) > 30
    fell_back = [_name(r) for r in rows if r["stages"] != r["kwargs"].get("num_stages", 3)]
    assert not fell_back, fell_back
    spills = [f"{_name(r)}: {r['spill']} bytes" for r in rows if r["spill"]]
    assert not spills, "\n".join(spills)


@pytest.mark.parametrize("triton", REPORTS)
def test_decode_gemv_instructions_per_weight(triton, request):
    """The packed weights' decode GEMV is bound by instruction issue, not by HBM: an H200 issues ~33 T
    lane-instructions/s (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz) and its HBM delivers ~8.5 T Q4_K weights/s
    (4.8 TB/s, 0.5625 bytes each), so a loop of ~4 lane-instructions per weight would keep up with it. Reading the
    codes by units of neighbours took Q4_K's loop from 22.6 to 7.7 and Q6_K's from 29.1 to 9.6 (SASS of the
    hottest loop x threads / weights per iteration); putting 4-bit codes under a float's mantissa instead of
    converting them took it to 6.4. A program of R rows dequantizes each value once and adds a multiply-add per
    row: at most 12 + 1.5 R per weight (Q4_K: 9.0, 11.7 and 17.4 for 2, 4 and 8 rows), where R one-row passes would
    cost 6.4 R. Loading the next slices' codes, scales (and one row's x) before multiplying one (Launch.ahead)
    changes the count by -0.2 to +0.3 for one row, -0.9 to +0.5 for 2 and 4. No loop converts codes from int to
    float (I2F / I2FP: 16 per clock and SM, a quarter of the integer rate; one per weight capped Q4_K near half the
    HBM rate): only the sub-scales are, once per run of 16 or 32 values. The GPU machine's Triton 3.6 converts a
    bf16 x once per weight in the one-row loop (Q4_K 8.3), so there the bounds hold for the float32 x the decoder
    gives packed weights (Q4_K 6.5 / 9.5 / 11.8 / 17.0)."""
    report = request.getfixturevalue(REPORTS[triton])
    rows = [r for r in report if "error" not in r and _is_gemv(r) and "loop" in r]
    assert len(rows) >= 20 and {r["kwargs"]["R"] for r in rows} == {1, 2, 4, 8}
    slow, converting = {}, {}
    for r in rows:
        kw = r["kwargs"]
        # per thread and iteration (a loop loading 1 / 3 slices ahead is unrolled by 2 / 4)
        weights = kw["BN"] * kw["BK"] / (32 * kw["num_warps"]) * {0: 1, 1: 2, 3: 4}[kw["AHEAD"]]
        per = r["loop"] / weights
        print(f"{_name(r)}: {r['loop']} instructions a loop, {per:.2f} lane-instructions per weight, "
              f"{r['conversions'] / weights:.3f} conversions")
        bound = (7.5 if kw["BITS"] == 4 else 11) if kw["R"] == 1 else 12 + 1.5 * kw["R"]
        if per > bound:
            slow[_name(r)] = round(per, 2)
        if r["conversions"] > weights / 8:
            converting[_name(r)] = r["conversions"] / weights
    assert not slow, slow
    assert not converting, converting


def test_tiled_dequantization_per_weight(report):
    """The tiled kernels (prefill, and decode steps of over GEMV_ROWS rows) dequantize a [BN, BK] tile per
    iteration for the tensor cores: read by units like the GEMV, each code made a float without a conversion and
    the scales loaded once per run, a weight costs at most 24 lane-instructions and a quarter of a conversion
    (Q4_K's 16-row tile: 17.8 and 0.25, the sub-scales; per value, as before: 42 and 2, Q5_K 52, Q6_K 41)."""
    rows = [r for r in report if "error" not in r and r["kernel"] in ("_packed_matmul_kernel", "_moe_kernel")
            and not r["kwargs"].get("DENSE", False) and not r["kwargs"]["IEEE"]]  # float32 x: products by FMAs
    assert len(rows) >= 20
    slow = {}
    for r in rows:
        kw = r["kwargs"]
        weights = kw["BN"] * kw["BK"] / (32 * kw["num_warps"])
        per, conv = r["loop"] / weights, r["conversions"] / weights
        print(f"{_name(r)}: {per:.2f} lane-instructions per weight, {conv:.3f} conversions")
        if per > 24 or conv > 0.25:
            slow[_name(r)] = (round(per, 2), round(conv, 3))
    assert not slow, slow
