"""numpy GGML quantizers: error bounds, gguf round trip, byte identity with llama.cpp's ggml."""

from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest

from levante.quant.kquants import BLOCK_SIZES, QUANT_TYPES, quantize

# rmse / std of N(0, 1) data after a round trip; llama.cpp's reference quantizers reach about
# Q2_K 0.30, Q3_K 0.15, Q4_K 0.071, Q5_K 0.036, Q6_K 0.018, Q4_0 0.087, Q8_0 0.0054.
BOUNDS = {
    "F32": 1e-7, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q5_1": 0.05, "Q5_0": 0.05, "Q4_1": 0.1, "Q4_0": 0.1,
    "Q6_K": 0.025, "Q5_K": 0.045, "Q4_K": 0.085, "Q3_K": 0.18, "Q2_K": 0.35,
}  # fmt: skip


def _data(rows: int = 32, cols: int = 1024, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_round_trip_error(qtype):
    x = _data()
    q = quantize(x, qtype)
    bs, ts = BLOCK_SIZES[qtype]
    assert q.dtype == np.uint8 and q.shape == (32, 1024 // bs * ts)
    back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype]).reshape(x.shape)
    rel = float(np.sqrt(np.mean((back - x) ** 2)) / x.std())
    assert rel < BOUNDS[qtype], f"{qtype}: rmse/std {rel:.4f}"


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_types_edge_cases(qtype):
    t = gguf.GGMLQuantizationType[qtype]
    zeros = np.zeros((2, 256), np.float32)
    assert np.all(gguf.quants.dequantize(quantize(zeros, qtype), t) == 0)
    const = np.full((1, 512), 0.25, np.float32)
    back = gguf.quants.dequantize(quantize(const, qtype), t)
    assert np.allclose(back, 0.25, atol=0.02)
    scaled = _data(4, 512, seed=3) * 1e3  # scale invariance of the relative error
    back = gguf.quants.dequantize(quantize(scaled, qtype), t).reshape(scaled.shape)
    assert np.sqrt(np.mean((back - scaled) ** 2)) / scaled.std() < BOUNDS[qtype]
    # 3-D input keeps its leading dims
    assert quantize(np.zeros((2, 3, 256), np.float32), qtype).shape == (2, 3, BLOCK_SIZES[qtype][1])
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.zeros((2, 128), np.float32), qtype)


def test_unknown_type():
    with pytest.raises(ValueError, match="unsupported quantization type"):
        quantize(np.zeros((1, 32), np.float32), "Q7_K")


def _ggml_quantize_chunk():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]  # fmt: skip

    def ref(x: np.ndarray, qtype: str) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        bs, ts = BLOCK_SIZES[qtype]
        out = np.zeros((x.shape[0], x.shape[1] // bs * ts), np.uint8)
        f(int(gguf.GGMLQuantizationType[qtype]), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return ref


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_byte_identical_to_ggml(qtype):
    """Same bytes as llama.cpp's ggml_quantize_chunk (no imatrix: the *_ref quantizers)."""
    ref = _ggml_quantize_chunk()
    rng = np.random.default_rng(1)
    cases = {
        "normal": rng.standard_normal((64, 1024)).astype(np.float32) * 0.02,
        "heavy_tail": rng.standard_t(2, (64, 512)).astype(np.float32),
        "positive": rng.uniform(0, 1, (16, 512)).astype(np.float32),
        "negative": -rng.uniform(0, 1, (16, 512)).astype(np.float32),
        "sparse": (rng.standard_normal((32, 512)) * (rng.random((32, 512)) < 0.05)).astype(np.float32),
        "tiny": (rng.standard_normal((8, 512)) * 1e-20).astype(np.float32),
        "constant": np.full((4, 512), -0.5, np.float32),
        "zeros": np.zeros((2, 512), np.float32),
        "one_block": rng.standard_normal((1, 256)).astype(np.float32),
        "wide": rng.standard_normal((2, 8192)).astype(np.float32),
    }
    for name, x in cases.items():
        ours, theirs = quantize(x, qtype), ref(x, qtype)
        bad = int((ours != theirs).any(axis=1).sum())
        assert bad == 0, f"{qtype} {name}: {bad}/{len(x)} rows differ from ggml"
