"""GGML quantizers in numpy: raw block bytes for the K types (Q2_K ... Q6_K) plus a dispatcher.

The K-type quantizers port llama.cpp's reference quantizers (`quantize_row_qX_K_ref` in
ggml/src/ggml-quants.c, with `make_qkx2_quants`, `make_q3_quants` and `make_qx_quants`), which is
what `llama-quantize` runs when no importance matrix is given. They are vectorised over
sub-blocks: every array is laid out as [element-in-sub-block, sub-block], so the per-sub-block sums
are accumulated one element after another in float32, in the C code's order, and every product /
division is done in float32 in the C code's order. The output is meant to be byte-identical to
llama.cpp's (tested against `ggml_quantize_chunk` of the libggml that llama-cpp-python ships).

The simple types (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are delegated to `gguf.quants.quantize`.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
_F = np.float32

# bytes per block and elements per block of every type this module writes
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SIMPLE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
QUANT_TYPES = SIMPLE_TYPES + K_TYPES

# blocks per chunk: bounds the temporaries (about 40 float32 copies of chunk * 256 values)
_CHUNK_BLOCKS = 1024


# ------------------------------------------------------------------------------------ helpers


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order (a C `for` loop accumulating in float32).

    numpy reduces a non-innermost axis of a C-contiguous array by accumulating one slice after
    another (pairwise summation only applies along the innermost axis), so it matches the C loop.
    """
    if a.ndim == 2 and a.shape[1] >= 2 and a.flags.c_contiguous:
        return np.add.reduce(a, axis=0)
    acc = a[0].copy()
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def _nearest(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int (round half to even), kept in float32; non-finite values -> 0."""
    r = np.rint(v)
    return np.where(np.isfinite(r), r, _F(0)).astype(_F, copy=False)


def _f16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: float32 -> float16 (round to nearest even)."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=_F).astype(np.float16)


def _f16_bytes(h: np.ndarray) -> np.ndarray:
    """float16 [n] -> uint8 [n, 2] (little-endian)."""
    return np.ascontiguousarray(h.astype("<f2")).view(np.uint8).reshape(-1, 2)


def _abs_argmax_value(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the value with the largest |x| (first one on ties) and that |x|."""
    ax = np.abs(x)
    idx = np.argmax(ax, axis=0)
    cols = np.arange(x.shape[1])
    return x[idx, cols], ax[idx, cols]


# ------------------------------------------------------------------------- scale searches


def _make_qkx2(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants for every column of x [n, R] (weights w [n, R]).

    Returns (scale [R], the_min [R] (a non-negative offset), L [n, R] float32 integers).
    """
    fmax = _F(nmax)
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    mn = np.minimum(mn, _F(0))
    deg = mx == mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rng = np.where(deg, _F(1), mx - mn)
        iscale = fmax / rng
        scale = _F(1) / iscale
        L = np.clip(_nearest(iscale * (x - mn)), 0, fmax)
        diff = scale * L + mn - x
        err = _seq_sum(w * (np.abs(diff) if use_mad else diff * diff))
        for step in range(nstep + 1):
            iscale = (_F(rmin) + _F(rdelta) * _F(step) + fmax) / (mx - mn)
            laux = np.clip(_nearest(iscale * (x - mn)), 0, fmax)
            wl = w * laux
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(wl * laux)
            sum_xl = _seq_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, _F(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = this_scale * laux + this_min - x
            cur = _seq_sum(w * (np.abs(diff) if use_mad else diff * diff))
            upd = (D > 0) & (cur < err) & ~deg
            if upd.any():
                L = np.where(upd, laux, L)
                err = np.where(upd, cur, err)
                scale = np.where(upd, this_scale, scale)
                mn = np.where(upd, this_min, mn)
    L = np.where(deg, _F(0), L)
    scale = np.where(deg, _F(0), scale)
    return scale.astype(_F), (-mn).astype(_F), L


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true) for every column of x [n, R] -> (scale [R], L [n, R] in 0..2*nmax-1)."""
    mx, amax = _abs_argmax_value(x)
    zero = amax < GROUP_MAX_EPS
    lo, hi = _F(-nmax), _F(nmax - 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F(-nmax) / np.where(zero, _F(1), mx)
        L = np.clip(_nearest(iscale * x), lo, hi)
        w = x * x
        wx = w * x
        sumlx = _seq_sum(wx * L)
        suml2 = _seq_sum((w * L) * L)
        for _ in range(5):
            changed = False
            for i in range(x.shape[0]):
                li = L[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                new_l = np.clip(_nearest(x[i] * sl2 / slx), lo, hi)
                slx2 = slx + wx[i] * new_l
                sl22 = sl2 + (w[i] * new_l) * new_l
                acc = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                if acc.any():
                    changed = True
                    L[i] = np.where(acc, new_l, li)
                    sumlx = np.where(acc, slx2, sumlx)
                    suml2 = np.where(acc, sl22, suml2)
            if not changed:  # a pass that changes nothing leaves the state as it was: later passes too
                break
        scale = np.where(suml2 > 0, sumlx / suml2, _F(0))
    L = np.where(zero, _F(0), L + _F(nmax))
    scale = np.where(zero, _F(0), scale)
    return scale.astype(_F), L


def _make_qx_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1, qw=NULL) for every column of x [n, R] -> (scale [R], L [n, R])."""
    mx, amax = _abs_argmax_value(x)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, _F(1), mx)
    lo, hi = _F(-nmax), _F(nmax - 1)
    w = x * x
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_nearest(iscale * x), lo, hi)
        return lv, _seq_sum(wx * lv), _seq_sum((w * lv) * lv)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lv, sumlx, suml2 = trial(_F(-nmax) / mx)
        L = lv + _F(nmax)
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(_F(nmax) + _F(0.1) * _F(step)) / mx
            lv, sumlx, suml2 = trial(iscale)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if upd.any():
                L = np.where(upd, lv + _F(nmax), L)
                scale = np.where(upd, sumlx / suml2, scale)
                best = np.where(upd, scale * sumlx, best)
    L = np.where(zero, _F(0), L)
    scale = np.where(zero, _F(0), scale)
    return scale.astype(_F), L


# ----------------------------------------------------------------------- per-type quantizers
# Each takes x [nb, 256] float32 and returns blocks [nb, type_size] uint8.


def _sub(x: np.ndarray, size: int) -> np.ndarray:
    """[nb, 256] -> [size, nb * 256/size]: element-in-sub-block first, sub-blocks in row order."""
    return np.ascontiguousarray(x.reshape(-1, size).T)


def _unsub(a: np.ndarray, nb: int) -> np.ndarray:
    return a.T.reshape(nb, QK_K)


def _u8(v: np.ndarray) -> np.ndarray:
    """C conversion of an int to uint8 (modulo 256)."""
    return (v.astype(np.int64) & 0xFF).astype(np.uint8)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """L [nb, 256] in 0..3 -> qs [nb, 64]: per 128-half, byte l holds L[l], L[l+32], L[l+64], L[l+96]."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales / mins [nb, 8] -> the 12-byte layout read by get_scale_min_k4."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    s = np.empty((ls.shape[0], 12), np.uint8)
    s[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    s[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return s


def _q45_k_common(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared part of Q4_K / Q5_K: sub-block fits, 6-bit scales, final integer levels."""
    nb = x.shape[0]
    xs = _sub(x, 32)
    sum_x2 = _seq_sum(xs * xs)
    av_x = np.sqrt(sum_x2 / _F(32))
    w = av_x + np.abs(xs)
    scales, mins, L = _make_qkx2(xs, w, nmax, rmin, 0.1, nstep, False)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0)).astype(_F)
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0)).astype(_F)
    ls = np.minimum(_u8(_nearest(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_u8(_nearest(inv_min[:, None] * mins)), 63)
    d16 = _f16(max_scale / _F(63))
    dmin16 = _f16(max_min / _F(63))
    d = d16.astype(_F)[:, None] * ls.astype(_F)  # [nb, 8]
    dm = dmin16.astype(_F)[:, None] * lm.astype(_F)
    Lb = _unsub(L, nb).reshape(nb, 8, 32)
    xb = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest((xb + dm[..., None]) / d[..., None]), 0, _F(nmax))
    Lb = np.where((d != 0)[..., None], lq, Lb).reshape(nb, QK_K).astype(np.uint8)
    head = np.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), _pack_scales_k4(ls, lm)], axis=1)
    return head, Lb


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    head, L = _q45_k_common(x, 15, -1.0, 20)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, qs], axis=1)


def _quantize_q5_k(x: np.ndarray) -> np.ndarray:
    head, L = _q45_k_common(x, 31, -0.5, 15)
    q = L.reshape(-1, 4, 2, 32)
    hi = q >> 4
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for k in range(4):
        qh |= (hi[:, k, 0] << (2 * k)) | (hi[:, k, 1] << (2 * k + 1))
    lo = q & 0xF
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([head, qh, qs], axis=1)


def _quantize_q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = _sub(x, 16)
    scales, mins, L = _make_qkx2(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
    scales = scales.reshape(nb, 16)
    mins = mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    q4 = _F(15)
    with np.errstate(divide="ignore"):
        isc = np.where(max_scale > 0, q4 / max_scale, _F(0)).astype(_F)
        imn = np.where(max_min > 0, q4 / max_min, _F(0)).astype(_F)
    sc = np.where((max_scale > 0)[:, None], _nearest(isc[:, None] * scales), _F(0)).astype(np.int64)
    mn = np.where((max_min > 0)[:, None], _nearest(imn[:, None] * mins), _F(0)).astype(np.int64)
    sbytes = _u8(sc | (mn << 4))
    d16 = _f16(np.where(max_scale > 0, max_scale / q4, _F(0)))
    dmin16 = _f16(np.where(max_min > 0, max_min / q4, _F(0)))
    d = d16.astype(_F)[:, None] * (sbytes & 0xF).astype(_F)
    dm = dmin16.astype(_F)[:, None] * (sbytes >> 4).astype(_F)
    Lb = _unsub(L, nb).reshape(nb, 16, 16)
    xb = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest((xb + dm[..., None]) / d[..., None]), 0, _F(3))
    Lb = np.where((d != 0)[..., None], lq, Lb).reshape(nb, QK_K)
    return np.concatenate([sbytes, _pack_2bit(Lb), _f16_bytes(d16), _f16_bytes(dmin16)], axis=1)


def _quantize_q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = _sub(x, 16)
    scales, L = _make_q3(xs, 4)
    scales = scales.reshape(nb, 16)
    max_scale, _ = _abs_argmax_value(scales.T)
    nz = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (_F(-32) / np.where(nz, max_scale, _F(1))).astype(_F)
        d16 = _f16(np.where(nz, _F(1) / iscale, _F(0)))
    lv = _nearest(iscale[:, None] * scales).astype(np.int64)
    lv = ((lv + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
    lv = np.where(nz[:, None], np.clip(lv, -32, 31) + 32, 0).astype(np.uint8)  # [nb, 16] in 0..63
    sb = np.zeros((nb, 12), np.uint8)
    sb[:, 0:8] = (lv[:, 0:8] & 0xF) | ((lv[:, 8:16] & 0xF) << 4)
    for m in range(4):
        for q in range(4):
            sb[:, 8 + m] |= (lv[:, 4 * q + m] >> 4) << (2 * q)
    sc = np.where(nz[:, None], lv.astype(_F) - _F(32), _F(-32))
    d = d16.astype(_F)[:, None] * sc
    Lb = _unsub(L, nb).reshape(nb, 16, 16)
    xb = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest(xb / d[..., None]), _F(-4), _F(3)) + _F(4)
    Lb = np.where((d != 0)[..., None], lq, Lb).reshape(nb, QK_K).astype(np.uint8)
    high = (Lb > 3).reshape(nb, 8, 32)
    hmask = np.zeros((nb, 32), np.uint8)
    for b in range(8):
        hmask |= high[:, b].astype(np.uint8) << b
    Lb = np.where(Lb > 3, Lb - 4, Lb)
    return np.concatenate([hmask, _pack_2bit(Lb), sb, _f16_bytes(d16)], axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = _sub(x, 16)
    scales, L = _make_qx_rmse1(xs, 32)
    scales = scales.reshape(nb, 16)
    max_scale, max_abs = _abs_argmax_value(scales.T)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = (_F(-128) / np.where(zero, _F(1), max_scale)).astype(_F)
        d16 = _f16(np.where(zero, _F(0), _F(1) / iscale))
    sc = np.minimum(_nearest(iscale[:, None] * scales), _F(127))
    sc = np.where(zero[:, None], _F(0), sc)
    d = d16.astype(_F)[:, None] * sc
    Lb = _unsub(L, nb).reshape(nb, 16, 16)
    xb = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest(xb / d[..., None]), _F(-32), _F(31)) + _F(32)
    Lb = np.where((d != 0)[..., None], lq, Lb)
    Lb = np.where(zero[:, None, None], _F(0), Lb).reshape(nb, 2, 4, 32).astype(np.uint8)
    lo = Lb & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    hi = Lb >> 4
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    scb = sc.astype(np.int64).astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scb, _f16_bytes(d16)], axis=1)


_K_QUANTIZERS = {
    "Q2_K": _quantize_q2_k,
    "Q3_K": _quantize_q3_k,
    "Q4_K": _quantize_q4_k,
    "Q5_K": _quantize_q5_k,
    "Q6_K": _quantize_q6_k,
}


def quantize_k(x: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize x [..., n] (n a multiple of 256) to a K type: uint8 [..., n/256 * type_size]."""
    fn = _K_QUANTIZERS[qtype]
    x = np.asarray(x, dtype=_F)
    if x.shape[-1] % QK_K:
        raise ValueError(f"{qtype} needs rows whose length is a multiple of {QK_K}, got {x.shape[-1]}")
    type_size = BLOCK_SIZES[qtype][1]
    flat = np.ascontiguousarray(x).reshape(-1, QK_K)
    out = np.empty((flat.shape[0], type_size), np.uint8)
    for s in range(0, flat.shape[0], _CHUNK_BLOCKS):
        out[s : s + _CHUNK_BLOCKS] = fn(flat[s : s + _CHUNK_BLOCKS])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * type_size)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize float rows x [..., n] to GGML type `qtype` (a name such as "Q4_K" or "F16").

    Returns the raw GGUF tensor bytes as uint8 [..., bytes_per_row]; `gguf.quants.dequantize`
    reads them back.
    """
    import gguf

    qtype = qtype.upper()
    if qtype not in BLOCK_SIZES:
        raise ValueError(f"unsupported quantization type {qtype!r}; choose from {', '.join(QUANT_TYPES)}")
    x = np.asarray(x, dtype=_F)
    if x.ndim == 0:
        raise ValueError("cannot quantize a scalar")
    block = BLOCK_SIZES[qtype][0]
    if x.shape[-1] % block:
        raise ValueError(f"{qtype} needs rows whose length is a multiple of {block}, got {x.shape[-1]}")
    if qtype in _K_QUANTIZERS:
        return quantize_k(x, qtype)
    if qtype == "F32":
        return np.ascontiguousarray(x).view(np.uint8)
    q = gguf.quants.quantize(np.ascontiguousarray(x), gguf.GGMLQuantizationType[qtype])
    q = np.ascontiguousarray(q)
    if q.dtype != np.uint8:
        q = q.view(np.uint8)
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        _match_ggml_zero_signs(x, q, qtype)
    return q


def _match_ggml_zero_signs(x: np.ndarray, q: np.ndarray, qtype: str) -> None:
    """Make the signs of zero scales / offsets equal ggml's, in place (values are unchanged).

    ggml's Q4_0 / Q5_0 compute d = max / -8 (or -16) with max = +0 for an all-zero block, giving
    d = -0.0; Q4_1 / Q5_1 store the block minimum as found by a strict `<` scan, i.e. the first
    element equal to the minimum, with that element's sign. gguf.quants writes +0 in both cases.
    """
    bs, ts = BLOCK_SIZES[qtype]
    xb = x.reshape(-1, bs)
    qb = q.reshape(-1, ts)
    if qtype in ("Q4_0", "Q5_0"):
        zero = ~np.any(xb != 0, axis=1)
        qb[zero, 0:2] = _f16_bytes(np.full(int(zero.sum()), -0.0, np.float16))
    else:
        first_min = xb[np.arange(len(xb)), np.argmin(xb, axis=1)]
        fix = first_min == 0
        qb[fix, 2:4] = _f16_bytes(_f16(first_min[fix]))
