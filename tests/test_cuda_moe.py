"""levante.cuda.moe: routing sorted by expert on the device, and the fused MoE (grouped GEMMs in Triton, run by
the interpreter on CPU) equal to the model's MoE module, for float and packed quantized experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from levante.cuda import FusedMoE, PackedWeight, fuse_moe
from levante.cuda.moe import ExpertStack, align_by_expert
from levante.cuda.triton_matmul import Launch
from levante.model import MLP, MoE
from levante.quant.base import DenseWeight
from levante.quant.kquants import quantize
from levante.quant.lowrank import LowRankWeight


def _packed(n: int, k: int, qtype: str, seed: int) -> PackedWeight:
    w = np.random.default_rng(seed).normal(0, 0.1, (n, k)).astype(np.float32)
    raw = torch.from_numpy(np.ascontiguousarray(quantize(w, qtype))).reshape(n, -1)
    return PackedWeight.from_ggml(raw, qtype, n, k)


def _dense(n: int, k: int, dtype=torch.float32) -> DenseWeight:
    return DenseWeight((torch.randn(n, k) * 0.1).to(dtype))


@pytest.mark.parametrize(("m", "k", "e", "bm"), [(1, 2, 8, 16), (5, 2, 4, 4), (33, 3, 6, 16)])
def test_align_by_expert(m, k, e, bm):
    torch.manual_seed(m)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(m)])
    r = align_by_expert(ids, e, Launch(bm, 64, 64))
    n_pad = int(r.n_padded)
    sorted_ids, blocks = r.sorted_ids.long(), r.block_expert.long()
    real = sorted_ids[sorted_ids < m * k]
    assert sorted(real.tolist()) == list(range(m * k))  # every pair once
    assert n_pad % bm == 0 and (sorted_ids[n_pad:] == m * k).all()
    for b in range(n_pad // bm):  # every block holds pairs of its own expert only
        pairs = sorted_ids[b * bm : (b + 1) * bm]
        pairs = pairs[pairs < m * k]
        assert len(pairs) and (ids.reshape(-1)[pairs] == blocks[b]).all()
    counts = torch.bincount(ids.reshape(-1), minlength=e)
    assert n_pad == int(((counts + bm - 1) // bm * bm).sum())  # only the chosen experts' blocks run


def _moe(kind: str, n_experts: int = 4) -> MoE:
    torch.manual_seed(0)
    if kind == "f32":
        experts = [MLP(_dense(96, 64), _dense(64, 96), _dense(96, 64)) for _ in range(n_experts)]
    elif kind == "bf16":
        experts = [MLP(_dense(96, 64, torch.bfloat16), _dense(64, 96, torch.bfloat16), _dense(96, 64, torch.bfloat16))
                   for _ in range(n_experts)]
    elif kind == "q4_k_m":  # Q4_K_M's expert types: gate / up Q4_K, down Q6_K
        experts = [MLP(_packed(256, 256, "Q4_K", i), _packed(256, 256, "Q6_K", 10 + i),
                       _packed(256, 256, "Q4_K", 20 + i)) for i in range(n_experts)]
    else:  # gate and up of different types: two stacks instead of one
        experts = [MLP(_packed(256, 256, "Q8_0", i), _packed(256, 256, "Q5_K", 10 + i),
                       _packed(256, 256, "Q4_0", 20 + i)) for i in range(n_experts)]
    dt = torch.bfloat16 if kind == "bf16" else torch.float32
    return MoE(_dense(n_experts, experts[0].w1.in_features, dt), experts, 2)


@pytest.mark.parametrize("kind", ["f32", "bf16", "q4_k_m", "mixed"])
@pytest.mark.parametrize("m", [1, 3, 6, 70])  # packed experts: 1 and 3 tokens by the GEMV (pairs sharing experts)
def test_fused_equals_module(kind, m):
    moe = _moe(kind)
    fused = FusedMoE.from_module(moe)
    assert fused is not None and (fused.w13 is None) == (kind == "mixed")
    dt = torch.bfloat16 if kind == "bf16" else torch.float32
    x = torch.randn(m, moe.gate.in_features).to(dt)
    with torch.inference_mode():
        want, got = moe(x).float(), fused(x).float()
    tol = 2e-2 if kind == "bf16" else 1e-5  # bf16: products rounded in another order
    assert (got - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize(("kind", "mode"), [("f32", "all"), ("bf16", "all"), ("q4_k_m", "none"), ("mixed", "none")])
def test_one_token_by_the_other_kernel(monkeypatch, kind, mode):
    """One token runs the GEMV for packed experts and the tiled kernel for float ones; LEVANTE_GEMV swaps them
    (the benchmark compares both): the other kernel gives the same result too."""
    from levante.cuda.moe import route

    moe = _moe(kind)
    fused = FusedMoE.from_module(moe)
    packed = fused.w2.parts[0].packed
    dt = torch.bfloat16 if kind == "bf16" else torch.float32
    x = torch.randn(1, moe.gate.in_features).to(dt)
    ids = torch.tensor([[2, 0]])
    assert route(ids, 4, packed).launch.bm == (1 if packed else 16)
    monkeypatch.setenv("LEVANTE_GEMV", mode)
    assert route(ids, 4, packed).launch.bm == (16 if packed else 1)
    with torch.inference_mode():
        want, got = moe(x).float(), fused(x).float()
    tol = 2e-2 if kind == "bf16" else 1e-5
    assert (got - want).abs().max() <= tol * want.abs().max()


# the LEVANTE_GEMV modes that pick different kernels: packed experts run the GEMV unless "none", float ones only with
# "all" (1 and 6 tokens: 1 and 6 pairs per expert of a rank's two); 70 tokens run the tiled kernel whatever the mode
SHARD_CASES = [(kind, m, mode) for kind, modes in (("f32", ("all", "none")), ("q4_k_m", ("packed", "none")))
               for m in (1, 6) for mode in modes] + [("f32", 70, "packed"), ("q4_k_m", 70, "packed")]


@pytest.mark.parametrize(("kind", "m", "mode"), SHARD_CASES)
def test_expert_parallel_shard(monkeypatch, kind, m, mode):
    """An expert-parallel rank's MoE (experts 1 and 3 of 4): fused, it equals the module's partial output (zero
    for pairs of the other rank's experts), by either kernel; the two ranks' outputs sum to the whole layer."""
    monkeypatch.setenv("LEVANTE_GEMV", mode)
    whole = _moe(kind)
    ranks = [MoE(whole.gate, [whole.experts[e] for e in ids], 2, expert_ids=ids) for ids in ([0, 2], [1, 3])]
    fused = [FusedMoE.from_module(r) for r in ranks]
    assert all(f is not None and f.n_experts == 2 for f in fused)
    x = torch.randn(m, whole.gate.in_features)
    with torch.inference_mode():
        want = [r(x) for r in ranks]
        got = [f(x) for f in fused]
        full = whole(x)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max()
    assert (got[0] + got[1] - full).abs().max() <= 1e-5 * full.abs().max()
    if m == 1:  # a token whose experts are both elsewhere: exactly zero here
        chosen = torch.softmax(whole.gate(x).float(), -1).topk(2).indices.reshape(-1).tolist()
        other = next(e for e in range(4) if e not in chosen)
        alone = FusedMoE.from_module(MoE(whole.gate, [whole.experts[other]], 2, expert_ids=[other]))
        with torch.inference_mode():
            assert not alone(x).any()


@pytest.mark.parametrize("mode", ["all", "none"])
def test_other_ranks_pairs_are_not_run(monkeypatch, mode):
    """Pairs routed to -1 (another rank's expert) are skipped by both kernels: their rows are never written."""
    from levante.cuda.moe import route
    from levante.cuda.triton_moe import moe_matmul

    monkeypatch.setenv("LEVANTE_GEMV", mode)
    stack = ExpertStack([_dense(96, 64) for _ in range(2)])
    ids = torch.tensor([[1, -1]])
    a = torch.randn(1, 64)
    c = torch.full((2, 96), 7.0)
    moe_matmul(a, c, stack, route(ids, 2, packed=False), 2)
    assert (c[1] == 7).all() and torch.allclose(c[0], a[0] @ stack.weight[1].T, atol=1e-5)


def test_not_fused_where_it_does_not_apply():
    moe = _moe("f32")
    moe.experts[1].w2 = _dense(64, 96, torch.bfloat16)  # one expert of another dtype
    assert FusedMoE.from_module(moe) is None
    with pytest.raises(TypeError, match="cannot stack"):
        ExpertStack([_packed(256, 256, "Q4_K", 0), _packed(256, 256, "Q6_K", 1)])


def test_fuse_moe_in_a_model(tmp_path):
    from fixtures import hf_model, save_hf

    from levante.loader import load

    net = load(save_hf(hf_model("mixtral_8x2"), tmp_path / "m")).model
    ids = torch.arange(3, 30)[None]
    with torch.inference_mode():
        want = net(ids)
        assert fuse_moe(net) == net.cfg.num_layers
        assert all(isinstance(layer.ffn, FusedMoE) for layer in net.model.layers)
        got = net(ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _lowrank(n: int, k: int, r: int, seed: int) -> LowRankWeight:
    g = torch.Generator().manual_seed(seed)
    return LowRankWeight(torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1)


@pytest.mark.parametrize("m", [1, 9])
def test_low_rank_experts_run_factored(m):
    """Low-rank experts (float factors of a different rank per matrix, as `levante compress` writes them) run as
    two grouped GEMMs per projection, ranks zero-padded per layer: equal to the module, never multiplied out."""
    experts = [MLP(_lowrank(96, 64, 8 + 4 * i, i), _lowrank(64, 96, 16 - 2 * i, 10 + i), _lowrank(96, 64, 12, 20 + i))
               for i in range(4)]
    moe = MoE(_dense(4, 64), experts, 2)
    fused = FusedMoE.from_module(moe)
    assert fused is not None and fused.w13 is None and len(fused.w2.parts[0].stacks) == 2
    assert fused.w1.parts[0].stacks[0].weight.shape == (4, 20, 64)  # A factors padded to the layer's largest rank, 20
    x = torch.randn(m, 64)
    with torch.inference_mode():
        want, got = moe(x), fused(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_low_rank_experts_with_quantized_factors():
    """A low-rank GGUF's factors (quantized, padded to whole blocks, so equal shapes): stacked as packed planes."""
    def lr(n, k, seed):
        return LowRankWeight(_packed(64, k, "Q4_K", seed), _packed(n, 64, "Q8_0", seed + 1))

    experts = [MLP(lr(256, 256, i), lr(256, 256, 10 + i), lr(256, 256, 20 + i)) for i in range(4)]
    moe = MoE(_dense(4, 256), experts, 2)
    fused = FusedMoE.from_module(moe)
    assert fused is not None and [st.qtype for st in fused.w2.parts[0].stacks] == ["Q4_K", "Q8_0"]
    x = torch.randn(5, 256)
    with torch.inference_mode():
        want, got = moe(x), fused(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _mixed_experts(quantized: bool) -> list[MLP]:
    """Experts as `levante compress` leaves them: each matrix factored, or kept full where its rank would not
    save parameters; here projection by projection (expert 0 full in w1 only, expert 3 full everywhere). Float
    factors of per-matrix ranks, or (`quantized`: a low-rank GGUF) Q4_K / Q8_0 factors next to Q4_K matrices."""
    def full(n, k, seed):
        return _packed(n, k, "Q4_K", seed) if quantized else _dense(n, k)

    def factored(n, k, seed):
        if quantized:
            return LowRankWeight(_packed(64, k, "Q4_K", seed), _packed(n, 64, "Q8_0", seed + 1))
        return _lowrank(n, k, 8 + seed % 5, seed)

    return [MLP(*(full(256, 256, 3 * i + j) if i == 3 or (i, j) == (0, 0) else factored(256, 256, 3 * i + j)
                  for j in range(3))) for i in range(4)]


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("m", [1, 9])
@pytest.mark.parametrize("mode", ["packed", "none"])
def test_low_rank_and_full_experts_in_one_layer(monkeypatch, quantized, m, mode):
    """A layer with some experts factored and some full runs fused: each projection as one part per kind, every
    pair's row written by its expert's part (no masking, no module path), equal to the module by either kernel."""
    monkeypatch.setenv("LEVANTE_GEMV", mode)
    moe = MoE(_dense(4, 256), _mixed_experts(quantized), 2)
    fused = FusedMoE.from_module(moe)
    assert fused is not None and fused.w13 is None
    assert [p.members for p in fused.w1.parts] == [(0, 3), (1, 2)]
    assert [p.members for p in fused.w2.parts] == [(0, 1, 2), (3,)]
    x = torch.randn(m, 256)
    with torch.inference_mode():
        want, got = moe(x), fused(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("m", [1, 6])
def test_experts_of_two_formats_share_one_gate_up_gemm(m):
    """Experts quantized to different types (a GGUF with per-expert tensors): a part per type, and gate / up still
    one GEMM per part where both projections split the experts alike."""
    types = ["Q4_K", "Q6_K", "Q4_K", "Q6_K"]
    experts = [MLP(_packed(256, 256, t, i), _packed(256, 256, "Q8_0", 10 + i), _packed(256, 256, t, 20 + i))
               for i, t in enumerate(types)]
    moe = MoE(_dense(4, 256), experts, 2)
    fused = FusedMoE.from_module(moe)
    assert fused is not None and fused.w13 is not None and len(fused.w13.parts) == 2
    assert [p.members for p in fused.w13.parts] == [(0, 2), (1, 3)] and len(fused.w2.parts) == 1
    x = torch.randn(m, 256)
    with torch.inference_mode():
        want, got = moe(x), fused(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("m", [1, 6])
def test_expert_parallel_rank_of_mixed_experts(m):
    """Expert parallelism over a mixed layer: each rank's parts index the global ids it holds; the two ranks'
    outputs sum to the whole layer."""
    whole = MoE(_dense(4, 256), _mixed_experts(False), 2)
    ranks = [MoE(whole.gate, [whole.experts[e] for e in ids], 2, expert_ids=ids) for ids in ([0, 2], [1, 3])]
    fused = [FusedMoE.from_module(r) for r in ranks]
    assert [[p.members for p in f.w2.parts] for f in fused] == [[(0, 2)], [(1,), (3,)]]
    x = torch.randn(m, 256)
    with torch.inference_mode():
        got = [f(x) for f in fused]
        for g, r in zip(got, ranks, strict=True):
            assert (g - r(x)).abs().max() <= 1e-5 * r(x).abs().max()
        full = whole(x)
    assert (got[0] + got[1] - full).abs().max() <= 1e-5 * full.abs().max()


@pytest.mark.parametrize("kind", ["Q4_K", "bf16"])
def test_experts_gemv_loads_ahead_change_no_value(kind):
    """A token's pairs take the one-row GEMV, which loads slices ahead as the dense one does (Launch.ahead; Mixtral's
    rows of 4096 and 14336 values: 3 ahead): the same sums, bit for bit, equal to each pair's expert times its row
    (float experts too, where LEVANTE_GEMV=all runs them by the GEMV)."""
    from dataclasses import replace

    from levante.cuda.moe import route
    from levante.cuda.triton_matmul import GEMV, gemv_launch
    from levante.cuda.triton_moe import moe_matmul

    k = 4 * 256
    experts = [_packed(24, k, "Q4_K", s) if kind == "Q4_K" else _dense(24, k, torch.bfloat16) for s in range(4)]
    stack = ExpertStack(experts)
    ids = torch.tensor([[3, 1]])
    routing = route(ids, 4, packed=True)
    x = torch.randn(1, k)
    assert routing.launch.gemv and gemv_launch(1, 2, 24, 32, k) == GEMV and GEMV.ahead == 3
    got = []
    for ahead in (0, 1, 3):
        c = torch.empty(2, 24)
        moe_matmul(x, c, stack, routing, 2, launch=replace(GEMV, ahead=ahead))  # each pair reads the token's row
        got.append(c)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    ref = torch.stack([x[0] @ experts[e].dequantize().float().T for e in (3, 1)])
    assert (got[2] - ref).abs().max() <= 1e-5 * ref.abs().max()
    # 3 tokens: blocks of pairs sorted by expert, by the GEMV program of 2 rows
    ids = torch.tensor([[3, 1], [1, 3], [3, 0]])
    routing = route(ids, 4, packed=True)
    x = torch.randn(3, k)
    assert routing.launch.gemv and routing.launch.bm == 2
    got = []
    for ahead in (0, 1, 3):
        c = torch.empty(6, 24)
        moe_matmul(x, c, stack, routing, 2, launch=replace(routing.launch, ahead=ahead))
        got.append(c)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    ref = torch.stack([x[p // 2] @ experts[e].dequantize().float().T for p, e in enumerate(ids.flatten().tolist())])
    assert (got[2] - ref).abs().max() <= 1e-5 * ref.abs().max()
