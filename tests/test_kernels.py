"""levante.quant.kernels: fast GGML matmul equals gguf.quants' dequantization (C++ and torch paths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402

from levante.quant import kernels as kq  # noqa: E402
from levante.quant.base import QuantWeight  # noqa: E402

SIMPLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
KTYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# f16 scale fields (byte offsets inside a block) of the K types
SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def make_raw(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in SIMPLE:
        w = rng.standard_normal((n, k)).astype(np.float32)
        return gguf.quants.quantize(w, GT[qtype])
    _, bs, ts = kq.QTYPES[qtype]
    raw = rng.integers(0, 256, (n, k // bs, ts), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        d = (rng.random((n, k // bs, 1)) * 0.02 + 1e-3).astype(np.float16)
        raw[..., off : off + 2] = d.view(np.uint8)
    return raw.reshape(n, -1)


def reference(raw: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, GT[qtype]).astype(np.float32)))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


@pytest.fixture(params=["ext", "torch"])
def path(request, monkeypatch):
    """Run each test through the C++ kernels and through the pure-torch fallback."""
    if request.param == "ext":
        if kq.extension() is None:
            pytest.skip("C++ extension unavailable")
    else:
        monkeypatch.setattr(kq, "extension", lambda: None)
    return request.param


SHAPES = {"Q": [(37, 96), (53, 576)], "K": [(37, 256), (19, 512)]}


@pytest.mark.parametrize("qtype", SIMPLE + KTYPES)
def test_dequantize_is_bit_exact(qtype, path):
    for n, k in SHAPES["K" if qtype in KTYPES else "Q"]:
        raw = make_raw(qtype, n, k, seed=n)
        w = kq.fast_weight(torch.from_numpy(raw), qtype, n, k)
        assert isinstance(w, QuantWeight) and w.shape == (n, k)
        got = w.dequantize()
        ref = reference(raw, qtype)
        assert got.dtype == torch.float32 and got.shape == (n, k)
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), f"{qtype} {n}x{k}"


@pytest.mark.parametrize("qtype", SIMPLE + KTYPES)
def test_matmul_matches_reference(qtype, path):
    for n, k in SHAPES["K" if qtype in KTYPES else "Q"]:
        raw = make_raw(qtype, n, k, seed=k)
        w = kq.fast_weight(torch.from_numpy(raw), qtype, n, k)
        ref_w = reference(raw, qtype)
        for m in (1, 3, 17):
            x = torch.randn(m, k)
            y = w.matmul(x)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert rel_err(y, x @ ref_w.T) < 1e-5, f"{qtype} {n}x{k} m={m}"
        x3 = torch.randn(2, 5, k)  # leading dims and another dtype
        assert w(x3).shape == (2, 5, n)
        yb = w.matmul(x3.bfloat16())
        assert yb.dtype == torch.bfloat16
        assert rel_err(yb.float(), x3.bfloat16().float() @ ref_w.T) < 1e-2


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_rows(qtype, path):
    n, k = 29, 256
    raw = make_raw(qtype, n, k, seed=3)
    w = kq.fast_weight(torch.from_numpy(raw), qtype, n, k)
    ids = torch.tensor([[0, 5, 28], [7, 7, 1]])
    got = w.rows(ids, torch.float32)
    assert got.shape == (2, 3, k)
    assert torch.equal(got, w.dequantize()[ids])
    assert w.rows(ids, torch.bfloat16).dtype == torch.bfloat16


def test_prefill_tiles_match(monkeypatch):
    """Many rows of x go through row tiles + F.linear; tiny tiles exercise the tiling."""
    n, k = 45, 512
    raw = make_raw("Q4_K", n, k, seed=9)
    w = kq.fast_weight(torch.from_numpy(raw), "Q4_K", n, k)
    monkeypatch.setattr(kq, "TILE_BYTES", 4 * k * 8)  # 8 rows per tile
    x = torch.randn(40, k)
    assert rel_err(w.matmul(x), x @ reference(raw, "Q4_K").T) < 1e-5


def test_numpy_input_and_bad_shapes():
    raw = make_raw("Q8_0", 8, 64)
    w = kq.fast_weight(raw, "Q8_0", 8, 64)  # numpy accepted
    assert torch.equal(w.dequantize(), reference(raw, "Q8_0"))
    with pytest.raises(ValueError):
        kq.fast_weight(torch.from_numpy(raw), "Q8_0", 8, 48)
    with pytest.raises(ValueError):
        kq.GGMLKernelWeight(torch.from_numpy(raw), "IQ2_XS", 8, 64)


@pytest.mark.parametrize("qtype", kq.INT4_TYPES)
def test_int4_codes_reproduce_ggml(qtype):
    """w = (q - 8)·s + z with float32 s, z reproduces the GGML values (exact for these data)."""
    n, k = 16, 256
    raw = make_raw(qtype, n, k, seed=5)
    stats = kq.int4_exactness(torch.from_numpy(raw), qtype, k, torch.float32)
    assert stats["max_ulps"] <= 1.0
    if qtype == "Q4_0":
        assert stats["exact_fraction"] == 1.0
    bf = kq.int4_exactness(torch.from_numpy(raw), qtype, k, torch.bfloat16)
    assert bf["rel_norm"] < 1e-2  # bf16 scales: lossy but close


@pytest.mark.parametrize("qtype", kq.INT4_TYPES)
def test_int4pack_weight_close(qtype):
    n, k = 40, 256
    raw = make_raw(qtype, n, k, seed=6)
    w = kq.Int4PackWeight(torch.from_numpy(raw), qtype, n, k)
    ref = reference(raw, qtype)
    x = torch.randn(3, k)
    assert rel_err(w.matmul(x), x @ ref.T) < 1e-2
    assert rel_err(w.dequantize(), ref) < 1e-2
