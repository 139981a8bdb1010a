import math

import pytest
import torch

from levante.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    argmax_rows,
    distribution,
    draw,
    make_generator,
    min_p_filter,
    sample,
    token_logprobs,
    top_k_candidates,
    top_k_filter,
    top_p_filter,
    typical_filter,
)


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in logits]


def test_top_k_keeps_exactly_k_largest():
    lg = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert kept(top_k_filter(lg, 2)) == [{1, 4}, {0, 1}]
    assert kept(top_k_filter(lg, [1, 3])) == [{1}, {0, 1, 2}]
    # ties: still exactly k
    assert len(kept(top_k_filter(torch.zeros(1, 10), 3))[0]) == 3
    # off
    for k in (0, -1, 99):
        assert torch.equal(top_k_filter(lg, k), lg)


def test_top_p_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    lg = probs.log()
    assert kept(top_p_filter(lg, 0.5)) == [{0}]
    assert kept(top_p_filter(lg, 0.6)) == [{0, 1}]
    assert kept(top_p_filter(lg, 0.7)) == [{0, 1}]
    assert kept(top_p_filter(lg, 0.71)) == [{0, 1, 2}]
    assert kept(top_p_filter(lg, 0.01)) == [{0}]
    assert kept(top_p_filter(lg, 1.0)) == [set(range(5))]
    # per-row values
    assert kept(top_p_filter(lg.repeat(2, 1), [0.6, 0.9])) == [{0, 1}, {0, 1, 2, 3}]


def test_min_p_relative_to_max():
    probs = torch.tensor([[0.4, 0.3, 0.19, 0.1, 0.01]])
    lg = probs.log() + 7.0  # shift must not matter
    assert kept(min_p_filter(lg, 0.5)) == [{0, 1}]
    assert kept(min_p_filter(lg, 0.25)) == [{0, 1, 2, 3}]
    assert kept(min_p_filter(lg, 1.0)) == [{0}]
    assert kept(min_p_filter(lg, 0.0)) == [set(range(5))]


def test_typical_filter_matches_definition():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    lg = probs.log()[None]
    ent = -(probs * probs.log()).sum()
    shift = (-probs.log() - ent).abs()
    order = shift.argsort().tolist()
    for p in (0.2, 0.5, 0.8, 0.93):
        exp, cum = set(), 0.0
        for i in order:
            exp.add(i)
            cum += probs[i].item()
            if cum >= p:
                break
        assert kept(typical_filter(lg, p)) == [exp], p
    assert kept(typical_filter(lg, 1.0)) == [set(range(5))]
    assert len(kept(typical_filter(lg, 1e-6))[0]) == 1


def test_filters_keep_at_least_one_token():
    lg = torch.randn(3, 50)
    for out in (top_k_filter(lg, 1), top_p_filter(lg, 1e-9), min_p_filter(lg, 1.0), typical_filter(lg, 1e-9)):
        assert all(len(s) >= 1 for s in kept(out))
        assert torch.equal(out.argmax(-1), lg.argmax(-1)) or out is not lg


def test_repeat_penalty_llama_cpp_semantics():
    lg = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    p = SamplingParams(repeat_penalty=2.0, repeat_last_n=3)
    # window = last 3 tokens: [0, 1, 0] (token 2 and 3 are outside)
    out = apply_penalties(lg, [[2, 3, 0, 1, 0]], p)
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 1.0, -1.0, 0.5]]))
    assert torch.equal(lg, torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]]))  # input untouched
    # whole history with -1, none with 0
    out = apply_penalties(lg, [[2, 3]], SamplingParams(repeat_penalty=2.0, repeat_last_n=-1))
    assert torch.allclose(out, torch.tensor([[2.0, -2.0, 0.5, -2.0, 0.5]]))
    out = apply_penalties(lg, [[0, 1]], SamplingParams(repeat_penalty=2.0, repeat_last_n=0))
    assert torch.equal(out, lg)


def test_frequency_presence_penalties():
    lg = torch.zeros(2, 4)
    p = SamplingParams(repeat_penalty=1.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(lg, [[1, 1, 1, 3], []], p)
    assert torch.allclose(out[0], torch.tensor([0.0, -(3 * 0.5 + 0.25), 0.0, -(0.5 + 0.25)]))
    assert torch.equal(out[1], torch.zeros(4))


def test_logit_bias():
    lg = torch.zeros(2, 5)
    ps = [SamplingParams(logit_bias={1: 2.5, 3: float("-inf")}), SamplingParams()]
    out = apply_logit_bias(lg, ps)
    assert out[0].tolist() == [0.0, 2.5, 0.0, float("-inf"), 0.0]
    assert out[1].tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="logit_bias"):
        apply_logit_bias(lg, SamplingParams(logit_bias={7: 1.0}))
    # bias forces the choice, even when greedy
    g = SamplingParams.greedy(logit_bias={4: 100.0})
    assert sample(torch.randn(3, 5), g).tolist() == [4, 4, 4]


def test_greedy_is_argmax_and_uses_penalties():
    lg = torch.randn(4, 30)
    assert torch.equal(sample(lg, SamplingParams.greedy()), lg.argmax(-1))
    assert torch.equal(sample(lg, SamplingParams(temperature=0.0)), lg.argmax(-1))
    # a heavy penalty on the argmax changes the pick
    top = lg[0].argmax().item()
    p = SamplingParams.greedy(presence_penalty=2.0, frequency_penalty=2.0)
    lg2 = lg[:1].clone()
    lg2[0, top] = lg2[0].max() + 1.0
    assert sample(lg2, p, history=[[top, top]]).item() != top


def test_argmax_rows_equals_torch_argmax():
    """The host's block-wise argmax gives torch's ids: the first of equal maxima (-0.0 and 0.0 equal), the first
    NaN before any number, rows all -inf, widths under, at and past whole blocks."""
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        B = int(torch.randint(1, 5, (1,), generator=g))
        V = int(torch.randint(1, 700, (1,), generator=g)) if trial % 50 else 32000
        x = torch.randint(-3, 3, (B, V), generator=g).float()
        r = torch.rand(B, V, generator=g)
        if trial % 3 == 0:
            x[r < 0.02] = float("nan")
        x[(r > 0.05) & (r < 0.1)] = float("-inf")
        x[(r > 0.1) & (r < 0.3)] = -0.0 if trial % 2 else 0.0
        if trial % 5 == 0:
            x[(r > 0.3) & (r < 0.32)] = float("inf")
        if trial % 7 == 0:
            x[0] = float("-inf")
        assert torch.equal(argmax_rows(x), x.argmax(-1)), (trial, B, V)
    x = torch.randn(3, 32000)
    assert torch.equal(argmax_rows(x), x.argmax(-1))


def test_temperature():
    lg = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    assert torch.allclose(apply_temperature(lg, [0.5, 0.0]), torch.tensor([[2.0, 4.0], [1.0, 2.0]]))


def test_seeded_sampling_reproducible_and_batch_independent():
    flat = torch.zeros(1, 1000)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)

    def draw(seed, n=8):
        g = make_generator(seed)
        return [sample(flat, p, [g]).item() for _ in range(n)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    # same seed in a batch next to other rows -> same draws
    g_rows = [make_generator(1), make_generator(99), make_generator(5)]
    params = [p, SamplingParams(temperature=1.5, top_k=3), SamplingParams.greedy()]
    batch = torch.zeros(3, 1000)
    got = [sample(batch, params, g_rows)[0].item() for _ in range(8)]
    assert got == draw(1)


def test_sampling_distribution_respects_filters():
    lg = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    p = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    g = make_generator(0)
    seen = {sample(lg, p, [g]).item() for _ in range(200)}
    assert seen == {3, 4}


def test_token_logprobs():
    lg = torch.randn(2, 20)
    chosen = torch.tensor([3, 7])
    lps, tops = token_logprobs(lg, chosen, 4)
    ref = torch.log_softmax(lg, -1)
    assert math.isclose(lps[0], ref[0, 3].item(), rel_tol=1e-6)
    assert math.isclose(lps[1], ref[1, 7].item(), rel_tol=1e-6)
    assert [len(t) for t in tops] == [4, 4]
    assert tops[0][0][0] == lg[0].argmax().item()
    assert all(a[1] >= b[1] for a, b in zip(tops[1], tops[1][1:]))
    lp, top = token_logprobs(lg[0], 3, 0)
    assert math.isclose(lp, ref[0, 3].item(), rel_tol=1e-6) and top == []


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(typical_p=0.0), "typical_p"),
        (dict(repeat_penalty=0.0), "repeat_penalty"),
        (dict(repeat_last_n=-5), "repeat_last_n"),
        (dict(frequency_penalty=3.0), "frequency_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(top_k=2.5), "top_k"),
        (dict(seed="x"), "seed"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
    ],
)
def test_invalid_params_raise(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_greedy_helper():
    g = SamplingParams.greedy(seed=3)
    assert g.temperature == 0 and g.is_greedy and g.repeat_penalty == 1.0 and g.seed == 3


def test_draw_is_the_inverse_transform():
    """Uniforms evenly spread over [0, 1) pick each token in proportion to its probability (rows not normalised);
    a token of probability 0 is never picked, not at u = 0 nor at the largest u below 1, not even last in a row."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.4, 0.2, 0.3], [2.0, 0.0, 0.0, 6.0, 0.0, 0.0]], dtype=torch.float64)
    n = 10000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for r in range(2):
        got = draw(probs[r].expand(n, -1), u)
        freq = torch.bincount(got, minlength=6).double() / n
        assert torch.allclose(freq, probs[r] / probs[r].sum(), atol=2 / n), (r, freq)
    edges = torch.tensor([0.0, 1 - 2**-53], dtype=torch.float64)
    assert draw(probs[:1].expand(2, -1), edges).tolist() == [1, 5]
    assert draw(probs[1:].expand(2, -1), edges).tolist() == [0, 3]


def test_sample_draws_from_distribution():
    """`sample` draws each sampled row from `distribution` (which speculative decoding accepts against): with the
    same generators, its tokens are `draw`'s at the uniforms those generators give, greedy rows their argmax."""
    lg = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(top_k=20), SamplingParams.greedy(), SamplingParams(top_p=0.8, min_p=0.0),
              SamplingParams(temperature=1.5, typical_p=0.9, repeat_penalty=1.3)]
    hist = [[1, 2, 3], [4], [5, 5], [int(lg[3].argmax()), 7]]
    for seed in range(5):
        got = sample(lg, params, [make_generator(seed + i) for i in range(4)], history=hist)
        u = torch.cat([torch.rand(1, generator=make_generator(seed + i), dtype=torch.float64) for i in (0, 2, 3)])
        want = draw(distribution(lg, params, hist)[[0, 2, 3]], u)
        assert got[[0, 2, 3]].tolist() == want.tolist()
        assert got[1] == distribution(lg, params, hist)[1].argmax()


def test_top_k_candidates_are_what_top_k_keeps():
    """Per-row k, ties at the k-th value (the lower ids kept, as the stable sort of top_k_filter keeps them; -0.0
    equals 0.0), -inf logits among the kept: the candidates are exactly top_k_filter's survivors, in ascending id
    order."""
    g = torch.Generator().manual_seed(3)
    lg = torch.randint(-3, 4, (5, 60), generator=g).float()  # many equal logits
    lg[2, 10:] = float("-inf")  # fewer finite logits than k
    lg[4] = torch.where(torch.arange(60) % 3 == 0, -0.0, torch.where(torch.arange(60) % 3 == 1, 0.0, -1.0))
    lg[4, 50] = 5.0
    ks = [1, 7, 15, 12, 9]
    vals, ids = top_k_candidates(lg, ks)
    want = top_k_filter(lg, ks)
    for r, k in enumerate(ks):
        got = ids[r, :k].tolist()
        assert got == sorted(set(got)) and len(got) == k, r  # k distinct ids, ascending
        assert {i for i in got if lg[r, i] > float("-inf")} == kept(want[r : r + 1])[0], r
        assert torch.equal(vals[r, :k], lg[r, ids[r, :k]]) and (vals[r, k:] == float("-inf")).all()
    assert vals.shape == (5, 15) and kept(want[2:3])[0] == set(range(10))
    assert ids[4, :9].tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 50]  # the zeros of either sign, lower ids first
    # without ties at the k-th value (on the host: topk's own ids, the tie rule skipped), the same survivors
    lg = torch.randn(3, 500, generator=g)
    ks = [1, 40, 62]
    vals, ids = top_k_candidates(lg, ks)
    want = top_k_filter(lg, ks)
    for r, k in enumerate(ks):
        assert ids[r, :k].tolist() == sorted(kept(want[r : r + 1])[0]) and (ids[r, k:] == 0).all(), r
        assert torch.equal(vals[r, :k], lg[r, ids[r, :k]]) and (vals[r, k:] == float("-inf")).all()


@pytest.mark.parametrize("top_k", [5, 40])
def test_candidates_give_the_whole_rows_distribution(monkeypatch, top_k):
    """The chain after top-k on its candidates gives the distribution (and the draws) of the chain on whole rows:
    top-p, min-p, typical, temperature, with equal logits and rows of different k."""
    from levante import sampling

    g = torch.Generator().manual_seed(0)
    lg = (torch.randn(4, 400, generator=g) * 2).round(decimals=1)  # equal logits at the k-th place too
    params = [SamplingParams(top_k=top_k), SamplingParams(top_k=3, top_p=0.7, min_p=0.0, temperature=1.3),
              SamplingParams(top_k=top_k, typical_p=0.8, top_p=1.0, min_p=0.1), SamplingParams.greedy()]
    cand = distribution(lg, params)
    picks = [sample(lg, params, [make_generator(s) for _ in range(4)]) for s in range(20)]
    monkeypatch.setattr(sampling, "CANDIDATES", 10**9)  # whole rows
    whole = distribution(lg, params)
    assert torch.allclose(cand, whole, rtol=0, atol=1e-12) and (cand[:3] > 0).sum(-1).min() > 1
    assert all(torch.equal(p, sample(lg, params, [make_generator(s) for _ in range(4)]))
               for s, p in enumerate(picks))


class _NoReadBack(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on an op that reads a tensor's values back to the host (on a GPU: the host waits for the device)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func not in self.READS, f"{func} reads the logits' values back"
        return func(*args, **(kwargs or {}))


def test_sampling_chain_reads_nothing_back():
    """The whole chain, every filter on in some row (penalties and logit bias included), greedy and sampled rows,
    seeded or not, decides on the host and draws on the logits' device: nothing is read back (on a GPU each read
    stopped the host until the decode step had run, so it could not queue the next one)."""
    lg = torch.randn(5, 200)
    params = [SamplingParams(), SamplingParams.greedy(logit_bias={3: 2.0}), SamplingParams(top_k=0, top_p=1.0,
              min_p=0.0, typical_p=0.5, frequency_penalty=0.5, presence_penalty=0.2),
              SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0),
              SamplingParams(temperature=0.7, top_k=5, seed=3)]
    gens = [make_generator(1), None, make_generator(2), None, make_generator(3)]
    hist = [[1, 2, 2], [3], [4, 5, 4], [], [199, 0]]
    with _NoReadBack():
        out = sample(lg, params, gens, history=hist)
        sample(lg, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0))
        distribution(lg, params, hist)
    assert out.shape == (5,) and out[1] == apply_logit_bias(lg[1:2], params[1]).argmax()


def test_penalties_for_the_batch_equal_row_by_row():
    """The batch's penalties from one flat index list equal each row's own (llama.cpp's definition, row by row),
    rows of every kind side by side: off, a window, the whole history, ids out of the vocabulary ignored."""
    g = torch.Generator().manual_seed(1)
    lg = torch.randn(5, 40, generator=g) * 3
    params = [SamplingParams(repeat_penalty=1.3, repeat_last_n=4), SamplingParams(repeat_penalty=1.0),
              SamplingParams(repeat_penalty=0.8, frequency_penalty=0.4, presence_penalty=-0.3, repeat_last_n=-1),
              SamplingParams(repeat_penalty=1.5, repeat_last_n=0), SamplingParams(frequency_penalty=1.0)]
    hist = [torch.randint(-2, 45, (30,), generator=g).tolist() for _ in range(5)]
    got = apply_penalties(lg, hist, params)
    for i, p in enumerate(params):
        row = lg[i].clone()
        if p.uses_history:
            window = hist[i] if p.repeat_last_n == -1 else hist[i][-p.repeat_last_n:]
            counts = torch.bincount(torch.tensor([t for t in window if 0 <= t < 40]), minlength=40).float()
            seen = counts > 0
            row = torch.where(seen, torch.where(row > 0, row / p.repeat_penalty, row * p.repeat_penalty), row)
            row = row - counts * p.frequency_penalty - seen.float() * p.presence_penalty
        assert torch.equal(got[i], row), i


@pytest.mark.gpu
def test_sampling_on_the_gpu_waits_for_nothing():
    """On CUDA, the chain (penalties, filters, seeded draws) runs under sync-debug mode "error" and draws what the
    CPU draws with the same generators."""
    lg = torch.randn(8, 32000) * 4
    params = [SamplingParams()] * 4 + [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                      repeat_penalty=1.0)] * 3 + [SamplingParams.greedy()]
    hist = [[1, 2, 3, 2]] * 8
    want = sample(lg, params, [make_generator(i) for i in range(8)], history=hist)
    gpu = lg.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sample(gpu, params, [make_generator(i) for i in range(8)], history=hist)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("params", [SamplingParams.greedy(), SamplingParams(), SamplingParams(top_k=0, top_p=0.9),
                                    SamplingParams(logit_bias={1: 5.0}, typical_p=0.5, top_k=0)])
def test_the_chain_leaves_the_callers_logits_as_they_were(params):
    """The chain reads the logits it is given (a greedy batch's are not even copied) and writes only tensors of its
    own: the caller's logits (a captured graph's output buffer) stay as they were."""
    g = torch.Generator().manual_seed(5)
    lg = torch.randn(3, 64, generator=g)
    before = lg.clone()
    hist = [[1, 2, 3, 3], [5], [7, 7, 1]]
    sample(lg, params, [make_generator(i) for i in range(3)], history=hist)
    distribution(lg, params, hist)
    assert torch.equal(lg, before)
