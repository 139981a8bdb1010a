"""GGML block dequantizers: bit-exact against gguf.quants (the numpy reference), and GGMLWeight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from levante.errors import UnsupportedQuantError, WeightsError  # noqa: E402
from levante.quant.ggml import GGML_TYPES, GGMLWeight, dequantize  # noqa: E402

QUANTIZABLE = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# K types: offsets of the f16 super-block scales (d, dmin) inside a block
K_SCALES = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _raw_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks with finite random f16 scales (every other byte random)."""
    rng = np.random.default_rng(seed)
    _, ts, _ = GGML_TYPES[qtype]
    raw = rng.integers(0, 256, (rows, blocks_per_row * ts), dtype=np.uint8)
    b = raw.reshape(-1, ts)
    offs = K_SCALES.get(qtype) or {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0]}[qtype]
    for o in offs:
        scale = (rng.standard_normal(b.shape[0]) * 0.05).astype(np.float16)
        scale[:4] = np.array([0.0, -0.0, 6e-8, 65504.0], dtype=np.float16)[: min(4, len(scale))]  # edge values
        b[:, o : o + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


def _ours(raw: np.ndarray, qtype: str) -> np.ndarray:
    return dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qtype).numpy()


@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_quantized_by_gguf_bit_exact(qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((24, 256)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    q = quantize(x, T[qtype])
    raw = q.view(np.uint8)
    ref = ref_dequantize(q if qtype != "BF16" else raw, T[qtype])
    assert _bits_equal(_ours(raw, qtype), ref.reshape(24, 256))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *K_SCALES])
def test_random_blocks_bit_exact(qtype):
    bs = GGML_TYPES[qtype][0]
    raw = _raw_blocks(qtype, rows=12, blocks_per_row=1024 // bs)
    assert _bits_equal(_ours(raw, qtype), ref_dequantize(raw, T[qtype]))


def test_float_types_bit_exact():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    assert _bits_equal(_ours(x.view(np.uint8), "F32"), x)
    h = x.astype(np.float16)
    assert _bits_equal(_ours(h.view(np.uint8), "F16"), ref_dequantize(h, T.F16))
    raw = rng.integers(0, 256, (5, 128), dtype=np.uint8)  # arbitrary bf16 bit patterns, NaNs included
    assert _bits_equal(_ours(raw, "BF16"), ref_dequantize(raw, T.BF16))


def test_dequantize_keeps_leading_dims():
    raw = _raw_blocks("Q4_K", rows=6, blocks_per_row=2)
    out = dequantize(torch.from_numpy(raw).reshape(2, 3, -1), "Q4_K")
    assert out.shape == (2, 3, 512)
    assert torch.equal(out.reshape(6, 512), torch.from_numpy(ref_dequantize(raw, T.Q4_K)))


def _weight(qtype: str, out: int = 300, inp: int = 512, seed: int = 3) -> GGMLWeight:
    bs = GGML_TYPES[qtype][0]
    if qtype in QUANTIZABLE:
        x = np.random.default_rng(seed).standard_normal((out, inp)).astype(np.float32)
        raw = quantize(x, T[qtype]).view(np.uint8)
    else:
        raw = _raw_blocks(qtype, out, inp // bs, seed)
    return GGMLWeight(torch.from_numpy(np.ascontiguousarray(raw)), qtype, (out, inp), name="w")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q6_K", "Q4_K"])
def test_matmul_and_rows(qtype):
    w = _weight(qtype)
    w.chunk_bytes = 64 * 512 * 4  # force several chunks (64 rows each) on a 300-row weight
    dense = w.dequantize(torch.float32)
    x = torch.randn(2, 5, 512)
    y = w(x)
    ref = x @ dense.T
    assert y.shape == (2, 5, 300)
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    ids = torch.tensor([[0, 299, 17], [5, 5, 100]])
    assert torch.equal(w.rows(ids, torch.float32), dense[ids])
    assert w.rows(ids, torch.bfloat16).dtype == torch.bfloat16
    yb = w(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb.float()).all()


def test_weight_is_zero_copy_view():
    raw = np.ascontiguousarray(_raw_blocks("Q8_0", 8, 2))
    t = torch.from_numpy(raw)
    w = GGMLWeight(t, "Q8_0", (8, 64))
    assert w.data.data_ptr() == t.data_ptr()
    assert w.nbytes == raw.nbytes and w.qtype == "Q8_0" and w.shape == (8, 64)


def test_errors():
    raw = torch.zeros(4, 18, dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantError, match="tensor blk.0.x: unsupported quant type IQ4_NL, supported: F32"):
        GGMLWeight(raw, "IQ4_NL", (4, 32), name="blk.0.x")
    with pytest.raises(WeightsError, match="expected \\(4, 36\\) uint8"):
        GGMLWeight(raw, "Q4_0", (4, 64))
    with pytest.raises(WeightsError, match="not a multiple of the Q4_K block size 256"):
        GGMLWeight(raw, "Q4_K", (4, 32))
    with pytest.raises(UnsupportedQuantError, match="Q8_K"):
        dequantize(raw, "Q8_K")
