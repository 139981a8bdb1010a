"""y = x @ W^T on a `PackedWeight`, dequantizing W in registers (Triton): a tiled kernel and a decode GEMV.

The tiled kernel computes a [BM, BN] tile of y per program: for each BK slice it loads the codes of BN rows from
their bit planes, applies the formula of levante.cuda.packed (d * sc * (q - OFF) + dm * mc) in float32, rounds to
x's dtype and accumulates x_tile @ w_tile^T in float32 with tl.dot. The weight is read once per M tile.

The GEMV (decode steps of up to GEMV_ROWS rows) reads each quantized byte once, the rows of one slice of W side by
side. One row multiplies the raw codes: within a run of GT values that share their scales,
sum_k W[n, k] x[k] = d * sc * sum_k (q - OFF) x  +  dm * mc * sum_k x, so a weight costs a code extraction and one
multiply-add (llama.cpp's dequantize-mul-mat-vec), not the scale loads and products of the full formula; the scales
are read once per run, and a program loads the next slice's codes, scales and x while it multiplies one
(`Launch.ahead`: the few programs of a 4096-row weight cannot hide HBM's latency by switching warps). R rows
dequantize each value once (one multiply-add: d * sc * q + (dm * mc - OFF * d * sc)) and multiply it with every
row, so a row costs a multiply-add per weight. Codes become floats without a conversion
instruction: their bits are moved under the mantissa of 2.0**BITS (`code_float`, `unit_float`), which gives
2**BITS + q exactly, and the 2**BITS is taken off with OFF. All run on CUDA, and on CPU tensors under
TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources


@dataclass(frozen=True)
class Launch:
    """Tile sizes and launch options of one kernel call (num_warps / num_stages matter on the GPU only)."""

    bm: int
    bn: int
    bk: int
    warps: int = 4
    stages: int = 3
    gemv: bool = False  # a GEMV program (bm: the rows of x it multiplies), else a tile of the tiled kernel
    ahead: int = 0  # GEMV: the slices whose loads are in flight while one is multiplied


def dot_launch(m: int, dense: bool = True, wide: bool = False) -> Launch:
    """The tiled kernels' configuration for m rows (tokens). Float weights: vLLM's fused_moe tuning for Mixtral's
    experts on the H200 (E=8, N=14336: 16-row tiles and deep pipelines for decode, 128-row tiles for prefill).
    Packed weights are dequantized in registers, a [BN, BK] tile at a time: vLLM's 128 x 128 tiles spilled there
    (compiled for sm_90 by tests/test_cuda_compile.py: up to 24 KB of spills per thread, before `weight_tile` read
    units), so they keep it at 2048-4096 values over 8 warps and 3 stages, which no format spills. `wide`: float32
    activations (an explicit dtype="float32" on a GPU), twice the bytes per value and float32 products without
    tensor cores: packed tiles stay at 64 x 64 x 32; float ones at 64 x 128 x 64 at most (vLLM's larger tiles spill
    up to 34 KB there, or need fewer stages than they ask)."""
    if not dense:
        if m <= 32:
            return Launch(16 if m <= 16 else 32, 64, 32, 8, 3)
        if wide:
            return Launch(64, 64, 32, 8, 3)
        return Launch(64, 64, 64, 8, 3) if m <= 128 else Launch(128, 128, 32, 8, 3)
    if wide:
        return Launch(16 if m <= 16 else 32 if m <= 32 else 64, 128, 64, 8, 3)
    if m <= 16:
        return Launch(16, 128, 128, 4, 5)
    if m <= 32:
        return Launch(16, 128, 128, 8, 3)
    if m <= 96:
        return Launch(32, 128, 128, 4, 3)
    if m <= 128:
        return Launch(64, 128, 128, 8, 4)
    return Launch(128, 256, 64, 8, 4)


_STAGES: dict[tuple, int] = {}  # (kernel, launch, constexprs) -> the pipeline stages that compiled


def run(kernel, grid: tuple, launch: Launch, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) with the launch's warps and stages; a configuration the GPU cannot hold
    (OutOfResources: shared memory or registers, which depend on the GPU and the weight format) is retried with
    fewer pipeline stages, down to one, and the stages that worked are kept for the next call."""
    key = (kernel, launch, tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, int | bool))))
    stages = _STAGES.get(key, launch.stages)
    while True:
        try:
            kernel[grid](*args, **kwargs, num_warps=launch.warps, num_stages=stages)
            _STAGES[key] = stages
            return
        except OutOfResources:
            if stages == 1:
                raise
            stages -= 1


GEMV = Launch(1, 16, 256, 4, 3, gemv=True, ahead=3)
GEMV_NEAR = replace(GEMV, ahead=1)
# One row of x; 16-row slices of W: a 4096-row weight spreads over 256 programs, 2 per SM of an H200 (8 warps): too
# few for switching warps to hide HBM's latency, so a program issues the loads of later slices (codes, scales, x)
# before it multiplies one (`ahead`). Reasoned, not measured: a slice that waits for its loads takes a latency
# (~0.7 us) plus its arithmetic (~0.25 us for 2 programs of ~200 instructions a warp per SM), ~13 % of HBM's rate for
# a 4096-row Q4_K weight; 1 slice ahead, max(latency, arithmetic): ~18 %; 3 ahead, the arithmetic: ~50 %. Loading
# ahead costs -0.2 to +0.3 lane-instructions per weight; 3 ahead keeps formats whose scales cover 32 values or more
# within 128 registers (4 programs per SM) on Triton 3.6 and 3.9, those of 16 (Q6_K, Q3_K, Q2_K) take 168-255 and
# spill on 3.9: they load 1 ahead (`GEMV_NEAR`, within 128).
# Up to GEMV_ROWS rows of x multiply packed weights by a GEMV program of that many rows (`gemv_launch`), which
# dequantizes each value once and multiplies it with every row. Compiled for sm_90 (the SASS counts of
# tests/triton_aot.py), lane-instructions per weight for 1 / 2 / 4 / 8 rows, by Triton 3.9 (CI's) and 3.6 (the
# GPU's): Q4_K 6.4 / 9.0 / 11.7 / 17.4 and 8.3 / 9.6 / 12.5 / 18.6, Q6_K 8.8 / 11.3 / 13.9 / 18.8 and 10.7 / 11.8 /
# 14.5 / 20.4, Q8_0 5.9 / 8.3 / 10.7 / 15.7 and 7.2 / 8.2 / 11.3 / 17.6, for bf16 x (3.6 converts it once per
# weight in the one-row loop, 3.9 before sharing it). float32 x, as the decoder passes a bf16 model's activations
# to packed weights (`packed_readers`), costs 3.6 Q4_K 6.5 / 9.5 / 11.8 / 17.0, Q6_K 9.1 / 11.6 / 13.5 / 17.9,
# Q8_0 5.6 / 8.0 / 10.1 / 14.8 (3.9: 0.1-1.1 fewer than bf16 x, INT8's one row 0.1 more). The tiled kernel's
# 16-row tile costs 13-19 whatever the rows used (3.9 / 3.6: Q4_K 17.8 / 17.3, Q6_K 18.8 / 17.8, Q8_0 13.4 / 13.4;
# 25-53 before `weight_tile` read units):
# as cheap as 8 GEMV rows, but its 64-row slices give a 4096-row weight 64 programs where the GEMV has 256, so
# decode steps of up to 8 rows keep the GEMV. At these rates both are bound by instruction issue rather than HBM
GEMV_ROWS = 8
# one row of x on a weight of WIDE_N rows or more (Mixtral's experts' gate and up, 14336; the LM head): slices of 32
# rows, where a thread takes twice the rows of W per value of x it converts and shares (sm_90 SASS per weight,
# Triton 3.9 / 3.6: Q4_K 6.4 / 8.3 -> 5.2 / 7.2, Q6_K 8.8 / 10.7 -> 7.8 / 9.9), and such a weight still has at least
# as many programs (256) as a 4096-row one by `GEMV`; Mixtral's experts' gate and up have 896 for their 2 pairs, 7
# per SM, which switch warps enough without loading ahead (which takes Q5_K and Q6_K to 128-255 registers here)
GEMV_WIDE = Launch(1, 32, 256, 4, 3, gemv=True)
WIDE_N = 8192
# A program of 2 or 4 rows (a batch's decode step on a dense weight) loads the next slice's codes and scales before it
# multiplies one (`Launch.ahead`) where the weight has under FEW_PROGRAMS programs (a 4096-row weight: 256, 2 per
# SM, which cannot hide HBM's latency by switching warps). sm_90 SASS, float32 x, Triton 3.6 / 3.9: every GGUF
# layout, AWQ4 and INT8 compile without spills in at most 168 / 168 registers (2 rows), 255 / 208 (4 rows); the
# loop changes by -0.9 to +0.5 lane-instructions per weight (Q4_K 9.50 -> 9.36 and 11.91 -> 11.45, Q6_K 11.62 ->
# 11.30 and 13.50 -> 13.47; 3.9: Q4_K 8.66 -> 8.48 and 11.22 -> 10.78). 8 rows spill (Q4_K: 140 bytes on 3.6);
# the experts' blocks of pairs give a weight 2 or more blocks of programs, enough to switch warps, where registers
# would cost residency.
FEW_PROGRAMS = WIDE_N // 16


def gemv_launch(rows: int, unit: int = 2, n: int = 0, g: int = 32, k: int = 0, blocks: int = 1) -> Launch:
    """The GEMV program for blocks of `rows` rows of x (rounded up to a power of two) on a weight of `n` rows of `k`
    values read by units of `unit` values (`gemv_unit`), with scales shared by runs of `g`: one row by `GEMV`
    (`GEMV_NEAR` for g < 32) or `GEMV_WIDE` from WIDE_N rows (codes times x summed per run, then scaled), loading
    fewer slices ahead where rows of k would leave its unrolled loop slices to spare (`loads_ahead`); more by
    16 x 256 slices of W, narrower where a thread would hold over 128 accumulators (one per unit and row; compiled
    for sm_90 by the GPU's Triton 3.6, 8 rows of 4-bit codes cost 18.7 lane-instructions per weight at 256 values,
    30.3 at 128, both in 229-255 registers, before `code_float`), loading a slice ahead in programs of 2 or 4 rows
    where the weight's `blocks` blocks of rows make few programs (`FEW_PROGRAMS`)."""
    if rows == 1:
        launch = GEMV_WIDE if n >= WIDE_N else GEMV if g >= 32 else GEMV_NEAR
        return replace(launch, ahead=loads_ahead(launch.ahead, k, launch.bk)) if k else launch
    r = triton.next_power_of_2(rows)
    bk = next(bk for bk in (256, 128, 64) if bk == 64 or r * 16 * bk // unit <= 128 * 128)
    few = r <= 4 and blocks * triton.cdiv(n, 16) < FEW_PROGRAMS
    return Launch(r, 16, bk, 4, 3, gemv=True, ahead=loads_ahead(1, k, bk) if few else 0)


def loads_ahead(most: int, k: int, bk: int) -> int:
    """The slices a one-row GEMV loads ahead (3, 1 or 0, at most `most`) on rows of k values in slices of bk: its
    loop, unrolled by ahead + 1, may multiply at most an eighth more slices than the rows hold (masked off, they read
    nothing but cost their arithmetic; Mixtral's 4096 and 14336 values are whole multiples of 4 slices)."""
    slices = triton.cdiv(k, bk)
    for ahead in (3, 1):
        if ahead <= most and triton.cdiv(slices, ahead + 1) * (ahead + 1) - slices <= slices // 8:
            return ahead
    return 0


def gemv_run(g: int, bk: int) -> int:
    """GT: the run of values sharing their scales that the GEMV sums before scaling (a power of two that divides
    both the format's scale group g and the slice bk; at most bk / 2, and 32: a run of 4-bit codes is then one
    thread's 16-byte load, summed without other threads)."""
    return min(math.gcd(g, bk), bk // 2, 32)


def tile_run(g: int, bk: int) -> int:
    """GT of the tiled kernels: the values of a BK slice that share their scales (a divisor of the scale group g)."""
    return math.gcd(g, bk)


def gemv_unit(bits: int, k: int) -> int:
    """U: the values a GEMV program of several rows reads as one unit of W: a byte of two 4-bit codes, 2 bytes of
    nibbles + a byte of high bits for 4 6-bit codes, 4 + 1 bytes for 8 5-bit ones, 4 bytes of 8-bit codes or 4
    float values where rows of k keep units aligned (else 1)."""
    if bits in (4, 5, 6):
        return {4: 2, 5: 8, 6: 4}[bits]
    return 4 if k % 4 == 0 else 1


def use_gemv(m: int, packed: bool) -> bool:
    """Whether m rows of x multiply by the GEMV: up to GEMV_ROWS rows, of packed weights (LEVANTE_GEMV=all: float
    ones too, =none: never; the benchmark compares them)."""
    mode = os.environ.get("LEVANTE_GEMV", "packed")
    return m <= GEMV_ROWS and (mode == "all" or (mode == "packed" and packed))


@triton.jit
def code_float(q, BITS: tl.constexpr, base):
    """2**BITS + q in float32, exactly, for codes 0 <= q < 2**BITS (int32): q's bits put under the mantissa of
    2.0**BITS (`base`: its bits, `float_base`). A shift and a logic operation instead of an int-to-float conversion
    (I2F / I2FP), which Hopper issues at 16 per clock and SM, against 64 for integer and 128 for float32 arithmetic:
    at a conversion per weight the GEMV would be capped near half the HBM rate of 4-bit weights. Callers take the
    2**BITS off with the codes' zero (q - OFF = f - (2**BITS + OFF), exact)."""
    return ((q << (23 - BITS)) | base).to(tl.float32, bitcast=True)


@triton.jit
def codes(lo_ptr, hi_ptr, row, col, K, ok, BITS: tl.constexpr):
    """The integer codes q[row, col] of a packed weight (row and col broadcast against each other), int32."""
    if BITS == 8:
        q = tl.load(lo_ptr + row * K + col, mask=ok, other=0).to(tl.int32)
    else:
        byte = tl.load(lo_ptr + row * (K // 2) + col // 2, mask=ok, other=0).to(tl.int32)
        q = (byte >> ((col % 2) * 4)) & 15
        if BITS == 5:
            h = tl.load(hi_ptr + row * (K // 8) + col // 8, mask=ok, other=0).to(tl.int32)
            q = q | (((h >> (col % 8)) & 1) << 4)
        if BITS == 6:
            h = tl.load(hi_ptr + row * (K // 4) + col // 4, mask=ok, other=0).to(tl.int32)
            q = q | (((h >> ((col % 4) * 2)) & 3) << 4)
    return q


@triton.jit
def scale_planes(d_ptr, sc_ptr, dm_ptr, mc_ptr, row, col, K, ok,
                 G: tl.constexpr, SG: tl.constexpr, HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr):
    """The scale planes (d, sc, dm, mc) at [row, col] as stored; those the format lacks are d again (never read)."""
    d = tl.load(d_ptr + row * (K // SG) + col // SG, mask=ok, other=0.0)
    sc, dm, mc = d, d, d
    if HAS_SC:
        sc = tl.load(sc_ptr + row * (K // G) + col // G, mask=ok, other=0)
    if HAS_MIN:
        dm = tl.load(dm_ptr + row * (K // SG) + col // SG, mask=ok, other=0.0)
        if HAS_MC:
            mc = tl.load(mc_ptr + row * (K // G) + col // G, mask=ok, other=0)
    return d, sc, dm, mc


@triton.jit
def scale_values(d, sc, dm, mc, HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr):
    """(d * sc, dm * mc) in float32 from `scale_planes` (without a min, the second is meaningless: not to be used)."""
    s = d.to(tl.float32)
    if HAS_SC:
        s = s * sc.to(tl.float32)
    m = s
    if HAS_MIN:
        m = dm.to(tl.float32)
        if HAS_MC:
            m = m * mc.to(tl.float32)
    return s, m


@triton.jit
def scales(d_ptr, sc_ptr, dm_ptr, mc_ptr, row, col, K, ok,
           G: tl.constexpr, SG: tl.constexpr, HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr):
    """(d * sc, dm * mc) at [row, col] in float32 (`scale_values` of `scale_planes`)."""
    d, sc, dm, mc = scale_planes(d_ptr, sc_ptr, dm_ptr, mc_ptr, row, col, K, ok, G, SG, HAS_SC, HAS_MIN, HAS_MC)
    return scale_values(d, sc, dm, mc, HAS_SC, HAS_MIN, HAS_MC)


def float_base(bits: int) -> int:
    """The bits of 2.0**bits as a float32, under whose mantissa `code_float` puts codes of `bits` bits. A kernel
    argument rather than a constant: ptxas then keeps it in one register, where as an immediate it re-materialized
    it before most uses (~0.8 instruction per weight in the 4-bit GEMV's loop)."""
    return (127 + bits) << 23


@triton.jit
def move(v, FROM: tl.constexpr, TO: tl.constexpr, N: tl.constexpr):
    """Bits FROM .. FROM + N - 1 of v (int32) moved to bits TO .. TO + N - 1, the others 0: a shift and a mask."""
    if TO >= FROM:
        v = v << (TO - FROM)
    else:
        v = v >> (FROM - TO)
    return v & (((1 << N) - 1) << TO)


@triton.jit
def unit_float(lo, hi, T: tl.constexpr, BITS: tl.constexpr, base):
    """2**BITS + code T of each unit, in float32 (`code_float`, each code's bits moved straight under the mantissa):
    8 bits at bit 8T of `lo`; else 4 bits at bit 4T of `lo` and, for 5 / 6-bit codes, 1 / 2 high bits at bit
    T / 2T of `hi`."""
    P: tl.constexpr = 23 - BITS
    if BITS == 8:
        f = move(lo, 8 * T, P, 8) | base
    else:
        f = move(lo, 4 * T, P, 4) | base  # a logic op of 3 inputs takes the mask and the base at once
        # the high bits join by xor (their bits are clear in f): ptxas then masks and joins them in one logic op,
        # where LLVM would regroup an `or` of the three parts into two
        if BITS == 5:
            f = f ^ move(hi, T, P + 4, 1)
        if BITS == 6:
            f = f ^ move(hi, 2 * T, P + 4, 2)
    return f.to(tl.float32, bitcast=True)


@triton.jit
def unit_planes(lo_ptr, hi_ptr, row, unit, ok, BITS: tl.constexpr, U: tl.constexpr):
    """The lo and hi planes (int32) of units of U values, unit `unit` of the row starting at unit `row` (broadcast
    against each other; `ok`: the mask), as `unit_float` reads them: lo holds U / 2 bytes of nibbles (8-bit codes:
    U bytes), read as one int32, uint16 or byte; hi one byte of 5th / 6th bits (other formats: lo again, never
    read). The pointers add `row`, then `unit`: the one-row GEMV's loop keeps them apart (their sum first costs
    Q4_K 0.15 instruction per weight there), the others pass the sum and 0."""
    LO: tl.constexpr = U if BITS == 8 else U // 2  # bytes of the lo plane per unit
    if LO == 4:
        lo = tl.load(lo_ptr.to(tl.pointer_type(tl.int32)) + row + unit, mask=ok, other=0)
    elif LO == 2:
        lo = tl.load(lo_ptr.to(tl.pointer_type(tl.uint16)) + row + unit, mask=ok, other=0).to(tl.int32)
    else:
        lo = tl.load(lo_ptr + row + unit, mask=ok, other=0).to(tl.int32)
    hi = lo
    if BITS == 5 or BITS == 6:
        hi = tl.load(hi_ptr + row + unit, mask=ok, other=0).to(tl.int32)
    return lo, hi


@triton.jit
def weight_tile(
    w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base, rn, k0, K, n_ok,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr,
    U: tl.constexpr,
):
    """W[rn, k0 : k0 + BK] in float32 (n_ok [BN, 1]: the real rows): a float weight as it is, or a packed one by its
    formula, read by the GEMV's units of U values (`gemv_unit`), each code made a float by `unit_float` and the
    units' values interleaved back into rows, the scales loaded once per run of GT values that share them."""
    if DENSE:
        rk = k0 + tl.arange(0, BK)
        return tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok & (rk < K)[None, :], other=0.0).to(tl.float32)
    unit = k0 // U + tl.arange(0, BK // U)
    ok = n_ok & (unit < K // U)[None, :]
    lo, hi = unit_planes(lo_ptr, hi_ptr, rn[:, None] * (K // U) + unit[None, :], 0, ok, BITS, U)
    # value U * unit + t: the joins below put t = 4a + 2b + c at [unit, a, b, c]
    f = unit_float(lo, hi, 0, BITS, base)
    if U == 2:
        f = tl.join(f, unit_float(lo, hi, 1, BITS, base))
    if U == 4:
        f = tl.join(tl.join(f, unit_float(lo, hi, 2, BITS, base)),
                    tl.join(unit_float(lo, hi, 1, BITS, base), unit_float(lo, hi, 3, BITS, base)))
    if U == 8:
        even = tl.join(tl.join(f, unit_float(lo, hi, 4, BITS, base)),
                       tl.join(unit_float(lo, hi, 2, BITS, base), unit_float(lo, hi, 6, BITS, base)))
        odd = tl.join(tl.join(unit_float(lo, hi, 1, BITS, base), unit_float(lo, hi, 5, BITS, base)),
                      tl.join(unit_float(lo, hi, 3, BITS, base), unit_float(lo, hi, 7, BITS, base)))
        f = tl.join(even, odd)
    first = k0 + tl.arange(0, BK // GT) * GT
    s, m = scales(d_ptr, sc_ptr, dm_ptr, mc_ptr, rn[:, None], first[None, :], K, n_ok & (first < K)[None, :], G, SG,
                  HAS_SC, HAS_MIN, HAS_MC)
    w = (tl.reshape(f, (f.shape[0], BK // GT, GT)) - ((1 << BITS) + OFF)) * s[:, :, None]  # (q - OFF) s, exact
    if HAS_MIN:
        w = w + m[:, :, None]
    return tl.reshape(w, (w.shape[0], BK))


@triton.jit
def slice_codes(
    x_ptr, w_ptr, lo_ptr, hi_ptr, rn, k0, K, n_ok,
    DENSE: tl.constexpr, BITS: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U8: tl.constexpr,
):
    """(x, lo, hi): the one-row GEMV's reads of x and of W's codes for the slice W[rn, k0 : k0 + BK], as stored
    (`run_sums` multiplies them; loads only, so that the loop can issue them slices ahead). The codes are read by
    units of U neighbours, each thread's contiguous (`unit_planes`): 4- and 5-bit codes by int32 words of 8 nibbles
    (+ a byte of 5th bits), 6-bit ones by 4 nibbles + a byte, 8-bit ones by int32 words of 4, x as the U values
    that multiply a unit's codes ([runs, GT / U, 2, 2(, 2)]). U8: 8-bit codes by words of 4 (rows of K % 4 == 0,
    `gemv_unit`), else one by one ([BN, runs, GT], as the values of a float W), and x as [runs, GT]."""
    run = tl.arange(0, BK // GT)
    if DENSE or (BITS == 8 and U8 != 4):
        col = k0 + run[:, None] * GT + tl.arange(0, GT)[None, :]  # [runs, GT]
        x = tl.load(x_ptr + col, mask=col < K, other=0.0)
        ok = n_ok[:, None, None] & (col < K)[None, :, :]
        if DENSE:
            lo = tl.load(w_ptr + rn[:, None, None] * K + col[None, :, :], mask=ok, other=0.0)
        else:
            lo = codes(lo_ptr, hi_ptr, rn[:, None, None], col[None, :, :], K, ok, BITS)
        hi = lo
    else:
        U: tl.constexpr = 8 if BITS == 4 or BITS == 5 else 4
        unit = k0 // U + run[:, None] * (GT // U) + tl.arange(0, GT // U)[None, :]  # [runs, GT / U]
        u_ok = unit < K // U
        lo, hi = unit_planes(lo_ptr, hi_ptr, rn[:, None, None] * (K // U), unit[None, :, :],
                             n_ok[:, None, None] & u_ok[None, :, :], BITS, U)
        two = tl.arange(0, 2)
        if U == 4:
            x = tl.load(x_ptr + 4 * unit[:, :, None, None] + 2 * two[None, None, :, None] + two[None, None, None, :],
                        mask=u_ok[:, :, None, None], other=0.0)
        else:
            x = tl.load(x_ptr + 8 * unit[:, :, None, None, None] + 4 * two[None, None, :, None, None]
                        + 2 * two[None, None, None, :, None] + two[None, None, None, None, :],
                        mask=u_ok[:, :, None, None, None], other=0.0)
    return x, lo, hi


@triton.jit
def slice_scales(d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok, DENSE: tl.constexpr, G: tl.constexpr,
                 SG: tl.constexpr, HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr,
                 BK: tl.constexpr, GT: tl.constexpr):
    """The scale planes of the slice's runs ([BN, BK / GT] each, `scale_planes`); a float W has none (d_ptr four
    times, never read)."""
    planes = (d_ptr, d_ptr, d_ptr, d_ptr)
    if not DENSE:
        first = k0 + tl.arange(0, BK // GT) * GT
        planes = scale_planes(d_ptr, sc_ptr, dm_ptr, mc_ptr, rn[:, None], first[None, :], K,
                              n_ok[:, None] & (first < K)[None, :], G, SG, HAS_SC, HAS_MIN, HAS_MC)
    return planes


@triton.jit
def run_sums(loaded, base, DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, U8: tl.constexpr):
    """(sum (q - OFF) x [BN, runs], sum x [runs]) per run of GT values that share their scales, from a slice's
    `slice_codes` (a float W: (sum w x, sum x)), in float32."""
    # one return, after if / else: Triton compiles the statements after a `return` in a constexpr branch too
    x, lo, hi = loaded
    x = x.to(tl.float32)
    if DENSE:
        qx = tl.sum(lo.to(tl.float32) * x[None, :, :], axis=2)
        xs = tl.sum(x, axis=1)
    else:
        if BITS < 8 or U8 == 4:
            U: tl.constexpr = 8 if BITS == 4 or BITS == 5 else 4
            if U == 4:
                even, odd = tl.split(x)
                x0, x2 = tl.split(even)
                x1, x3 = tl.split(odd)
                xs = x0 + x1 + x2 + x3
                qx = unit_float(lo, hi, 0, BITS, base) * x0[None, :, :]
                qx += unit_float(lo, hi, 1, BITS, base) * x1[None, :, :]
                qx += unit_float(lo, hi, 2, BITS, base) * x2[None, :, :]
                qx = tl.sum(qx + unit_float(lo, hi, 3, BITS, base) * x3[None, :, :], axis=2)
            else:
                even, odd = tl.split(x)
                e0, e2 = tl.split(even)
                o0, o2 = tl.split(odd)
                x0, x4 = tl.split(e0)
                x2, x6 = tl.split(e2)
                x1, x5 = tl.split(o0)
                x3, x7 = tl.split(o2)
                xs = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
                qx = unit_float(lo, hi, 0, BITS, base) * x0[None, :, :]
                qx += unit_float(lo, hi, 1, BITS, base) * x1[None, :, :]
                qx += unit_float(lo, hi, 2, BITS, base) * x2[None, :, :]
                qx += unit_float(lo, hi, 3, BITS, base) * x3[None, :, :]
                qx += unit_float(lo, hi, 4, BITS, base) * x4[None, :, :]
                qx += unit_float(lo, hi, 5, BITS, base) * x5[None, :, :]
                qx += unit_float(lo, hi, 6, BITS, base) * x6[None, :, :]
                qx = tl.sum(qx + unit_float(lo, hi, 7, BITS, base) * x7[None, :, :], axis=2)
            xs = tl.sum(xs, axis=1)
        else:
            xs = tl.sum(x, axis=1)
            qx = tl.sum(code_float(lo, BITS, base) * x[None, :, :], axis=2)
        # sum (q - OFF) x = sum (2**BITS + q) x - (2**BITS + OFF) sum x, the codes' zero and 2**BITS at most 384
        # times sum x: the difference stays well conditioned
        qx = qx - ((1 << BITS) + OFF) * xs[None, :]
    return qx, xs


@triton.jit
def scaled(acc, qx, xs, planes, DENSE: tl.constexpr, HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr,
           HAS_MC: tl.constexpr):
    """acc + the runs' sums (`run_sums`) times their scales (`slice_scales`: d * sc * qx + dm * mc * xs)."""
    part = qx
    if not DENSE:
        d, sc, dm, mc = planes
        s, m = scale_values(d, sc, dm, mc, HAS_SC, HAS_MIN, HAS_MC)
        part = s * qx
        if HAS_MIN:
            part = part + m * xs[None, :]
    return acc + part


@triton.jit
def slice_loads(
    x_ptr, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok,
    DENSE: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr,
    U8: tl.constexpr,
):
    """(`slice_codes`, `slice_scales`): all the one-row GEMV reads for one slice."""
    return (slice_codes(x_ptr, w_ptr, lo_ptr, hi_ptr, rn, k0, K, n_ok, DENSE, BITS, BK, GT, U8),
            slice_scales(d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok, DENSE, G, SG, HAS_SC, HAS_MIN, HAS_MC, BK, GT))


@triton.jit
def gemv_slice(acc, loads, base, DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr,
               HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, U8: tl.constexpr):
    """acc [BN, BK / GT] + W[rn, k0 : k0 + BK] @ x[k0 : k0 + BK] per run, from the slice's loads (its
    `slice_codes` and `slice_scales`): the codes times x summed per run, then scaled (float32 throughout). The
    caller sums the runs once, after its last slice: no reduction across threads inside the loop."""
    loaded, planes = loads
    qx, xs = run_sums(loaded, base, DENSE, BITS, OFF, U8)
    return scaled(acc, qx, xs, planes, DENSE, HAS_SC, HAS_MIN, HAS_MC)


@triton.jit
def rows_loads(
    w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok,
    DENSE: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, SG: tl.constexpr, HAS_SC: tl.constexpr,
    HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U: tl.constexpr,
):
    """(values, `slice_scales`): the multi-row GEMV's reads of W[rn, k0 : k0 + BK] by units of U neighbours
    (`gemv_unit`), [BN, runs, GT / U] each: a packed W's codes (lo, hi) by `unit_planes`, a float W's values as U
    tiles (the units' t-th values). Loads only, so that the loop can issue them slices ahead."""
    run = tl.arange(0, BK // GT)
    unit = k0 // U + run[:, None] * (GT // U) + tl.arange(0, GT // U)[None, :]  # [runs, GT / U]
    ok = n_ok[:, None, None] & (unit < K // U)[None, :, :]
    at = rn[:, None, None] * (K // U) + unit[None, :, :]
    if DENSE:
        values = (tl.load(w_ptr + U * at, mask=ok, other=0.0),)
        for t in tl.static_range(1, U):
            values = values + (tl.load(w_ptr + U * at + t, mask=ok, other=0.0),)
    else:
        values = unit_planes(lo_ptr, hi_ptr, at, 0, ok, BITS, U)
    return values, slice_scales(d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok, DENSE, G, SG, HAS_SC, HAS_MIN,
                                HAS_MC, BK, GT)


@triton.jit
def rows_slice(
    acc, loads, x_ptr, x_off, r_ok, base, k0, K,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr,
    HAS_MC: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U: tl.constexpr,
):
    """acc [R, BN, BK / GT, GT / U] + the products of the slice W[rn, k0 : k0 + BK] (its `rows_loads`) with R rows
    of x (at x_ptr + x_off [R]; r_ok: the real ones): each value of a packed W is dequantized once
    (d * sc * q + (dm * mc - OFF * d * sc), the scales loaded once per run of GT), then multiplied with every
    row, one multiply-add per value and row. The caller sums the last two axes once, after its last slice."""
    values, planes = loads
    if not DENSE:
        d, sc, dm, mc = planes
        s, m = scale_values(d, sc, dm, mc, HAS_SC, HAS_MIN, HAS_MC)
        zero: tl.constexpr = (1 << BITS) + OFF  # code_float's 2**BITS and the codes' zero
        m = m - zero * s if HAS_MIN else -zero * s
        lo, hi = values
    run = tl.arange(0, BK // GT)
    unit = k0 // U + run[:, None] * (GT // U) + tl.arange(0, GT // U)[None, :]  # [runs, GT / U]
    xu = x_ptr + x_off[:, None, None] + U * unit[None, :, :]  # [R, runs, GT / U]: each unit's first x
    x_ok = r_ok[:, None, None] & (unit < K // U)[None, :, :]
    for t in tl.static_range(U):
        if DENSE:
            w = values[t].to(tl.float32)
        else:
            w = unit_float(lo, hi, t, BITS, base) * s[:, :, None] + m[:, :, None]
        x = tl.load(xu + t, mask=x_ok, other=0.0).to(tl.float32)
        acc = acc + w[None, :, :, :] * x[:, None, :, :]
    return acc


@triton.jit
def gemv_loads(
    x_ptr, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok,
    DENSE: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, SG: tl.constexpr, HAS_SC: tl.constexpr,
    HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr,
    U: tl.constexpr,
):
    """A slice's loads: one row's `slice_loads` (x too), more rows' `rows_loads` (W only)."""
    if R == 1:
        loads = slice_loads(x_ptr, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok, DENSE, BITS,
                            G, SG, HAS_SC, HAS_MIN, HAS_MC, BK, GT, U)
    else:
        loads = rows_loads(w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok, DENSE, BITS, G, SG,
                           HAS_SC, HAS_MIN, HAS_MC, BK, GT, U)
    return loads


@triton.jit
def gemv_step(
    acc, loads, x_ptr, x_off, r_ok, base, k0, K,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr,
    HAS_MC: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U: tl.constexpr,
):
    """acc + slice k0's products from its `gemv_loads`: one row's `gemv_slice`, more rows' `rows_slice`."""
    if R == 1:
        acc = gemv_slice(acc, loads, base, DENSE, BITS, OFF, HAS_SC, HAS_MIN, HAS_MC, U)
    else:
        acc = rows_slice(acc, loads, x_ptr, x_off, r_ok, base, k0, K, DENSE, BITS, OFF, HAS_SC, HAS_MIN, HAS_MC, BK,
                         GT, U)
    return acc


@triton.jit
def gemv(
    x_ptr, x_off, r_ok, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base, rn, K, n_ok,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr,
    R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U: tl.constexpr, AHEAD: tl.constexpr,
):
    """y [R, BN] = the R rows of x at x_ptr + x_off [R] (r_ok: the real ones) @ W[rn]^T over all K, slice by
    slice (one row by `gemv_slice`, more by `rows_slice`), loading AHEAD slices ahead (`Launch.ahead`)."""
    if R == 1:
        x_ptr = x_ptr + tl.sum(x_off, axis=0)
        acc = tl.zeros((BN, BK // GT), dtype=tl.float32)
    else:
        acc = tl.zeros((R, BN, BK // GT, GT // U), dtype=tl.float32)
    if AHEAD == 0 and R == 1:  # the scales loaded after the codes are summed: in this order, no launch spills on 3.6
        for k0 in range(0, K, BK):
            qx, xs = run_sums(slice_codes(x_ptr, w_ptr, lo_ptr, hi_ptr, rn, k0, K, n_ok, DENSE, BITS, BK, GT, U),
                              base, DENSE, BITS, OFF, U)
            planes = slice_scales(d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok, DENSE, G, SG, HAS_SC, HAS_MIN,
                                  HAS_MC, BK, GT)
            acc = scaled(acc, qx, xs, planes, DENSE, HAS_SC, HAS_MIN, HAS_MC)
    elif AHEAD == 0:
        for k0 in range(0, K, BK):
            loads = gemv_loads(x_ptr, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, k0, K, n_ok, DENSE,
                               BITS, G, SG, HAS_SC, HAS_MIN, HAS_MC, R, BK, GT, U)
            acc = gemv_step(acc, loads, x_ptr, x_off, r_ok, base, k0, K, DENSE, BITS, OFF, HAS_SC, HAS_MIN, HAS_MC,
                            R, BK, GT, U)
    else:
        # the loads of the AHEAD slices after slice k0 are in flight while slice k0 is multiplied (past K they are
        # masked off and read nothing): without them, each slice waits a full memory latency. The loop is unrolled
        # by AHEAD + 1 (tl.static_range): each slice's loads then land in the registers of the one they replace,
        # where a loop of one slice would copy them over from one iteration to the next.
        queue = (gemv_loads(x_ptr, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, 0, K, n_ok, DENSE, BITS,
                            G, SG, HAS_SC, HAS_MIN, HAS_MC, R, BK, GT, U),)
        for j in tl.static_range(1, AHEAD):
            queue = queue + (gemv_loads(x_ptr, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, j * BK, K,
                                        n_ok, DENSE, BITS, G, SG, HAS_SC, HAS_MIN, HAS_MC, R, BK, GT, U),)
        for k0 in range(0, K, (AHEAD + 1) * BK):
            for j in tl.static_range(AHEAD + 1):
                later = gemv_loads(x_ptr, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn,
                                   k0 + (j + AHEAD) * BK, K, n_ok, DENSE, BITS, G, SG, HAS_SC, HAS_MIN, HAS_MC, R, BK,
                                   GT, U)
                acc = gemv_step(acc, queue[0], x_ptr, x_off, r_ok, base, k0 + j * BK, K, DENSE, BITS, OFF, HAS_SC,
                                HAS_MIN, HAS_MC, R, BK, GT, U)
                queue = queue[1:] + (later,)
    if R == 1:
        y = tl.sum(acc, axis=1)[None, :]
    else:
        y = tl.sum(tl.sum(acc, axis=3), axis=2)
    return y


@triton.jit
def dot_acc(acc, x, w, IEEE: tl.constexpr):
    """acc + x @ w^T with w rounded to x's dtype: on tensor cores, or (IEEE) as exact float32 products."""
    if IEEE:
        acc = acc + tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), input_precision="ieee")
    else:
        acc = acc + tl.dot(x, tl.trans(w.to(x.dtype)))
    return acc


def use_ieee(dtype: torch.dtype, interpreted: bool | None = None) -> bool:
    """float32 inputs multiply as float32; so do bfloat16 ones under the interpreter (`interpreted`, default: as
    TRITON_INTERPRET says), whose tl.dot misreads bfloat16 (the values are the same: bf16 -> f32 is exact)."""
    if interpreted is None:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted)


# M (the tokens) unspecialized: one kernel for every prompt length; sm_90 code is the same for M % 16 == 0
@triton.jit(do_not_specialize=["M"])
def _packed_matmul_kernel(
    x_ptr, y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base,
    M, N, K, stride_xm, stride_ym,
    BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk[None, :] < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok & k_ok, other=0.0)
        w = weight_tile(lo_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base, rn, k0, K, n_ok,
                        False, BITS, OFF, G, SG, HAS_SC, HAS_MIN, HAS_MC, BK, GT, U)
        acc = dot_acc(acc, x, w, IEEE)
    y_ok = m_ok & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_ok)


@triton.jit
def _packed_gemv_kernel(
    x_ptr, y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base, M, N, K, stride_xm, stride_ym,
    BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr,
    R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U: tl.constexpr, AHEAD: tl.constexpr,
):
    # the row blocks of one slice of W side by side: the slice is read from HBM once
    rows = tl.program_id(0) * R + tl.arange(0, R)
    r_ok = rows < M
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = rn < N
    y = gemv(x_ptr, rows * stride_xm, r_ok, lo_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base, rn, K, n_ok,
             False, BITS, OFF, G, SG, HAS_SC, HAS_MIN, HAS_MC, R, BN, BK, GT, U, AHEAD)
    tl.store(y_ptr + rows[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & n_ok[None, :])


def planes(w) -> tuple[Tensor, ...]:
    """(lo, hi, d, sc, dm, mc) of a PackedWeight, empty planes replaced by a real tensor (never read)."""
    dummy = w.lo
    return (w.lo, w.hi if w.hi.numel() else dummy, w.d, w.sc if w.sc.numel() else dummy,
            w.dm if w.dm.numel() else w.d, w.mc if w.mc.numel() else dummy)


def packed_matmul(x: Tensor, w, launch: Launch | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """x [..., K] @ W^T -> [..., N] in `out_dtype`, default x's (float32 x: exact float32 products; the GEMV's
    products are float32 whatever x's dtype, so float32 x holding bf16 values gives the bf16 x's results); `w`: a
    levante.cuda PackedWeight (not imported here: it imports this module when it first multiplies). Up to
    GEMV_ROWS rows of x run the GEMV, more the tiled kernel (`launch`: another configuration, for the benchmark's
    comparisons)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    M, K = x2.shape
    N = w.out_features
    if K != w.in_features:
        raise ValueError(f"x has {K} features, the weight {w.in_features}")
    y = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    fmt = dict(BITS=w.bits, OFF=w.off, G=w.g, SG=w.sg, HAS_SC=w.sc.numel() > 0, HAS_MIN=w.dm.numel() > 0,
               HAS_MC=w.mc.numel() > 0)
    wide = x.dtype == torch.float32
    unit = gemv_unit(w.bits, K)
    cfg = launch
    if cfg is None:
        cfg = gemv_launch(M, unit, N, w.g, K) if use_gemv(M, packed=True) else dot_launch(M, dense=False, wide=wide)
    if cfg.gemv:
        run(_packed_gemv_kernel, (triton.cdiv(M, cfg.bm), triton.cdiv(N, cfg.bn)), cfg,
            x2, y, *planes(w), float_base(w.bits), M, N, K, x2.stride(0), y.stride(0), **fmt, R=cfg.bm, BN=cfg.bn,
            BK=cfg.bk, GT=gemv_run(w.g, cfg.bk), U=unit, AHEAD=cfg.ahead)
    else:
        run(_packed_matmul_kernel, (triton.cdiv(M, cfg.bm), triton.cdiv(N, cfg.bn)), cfg,
            x2, y, *planes(w), float_base(w.bits), M, N, K, x2.stride(0), y.stride(0), **fmt, IEEE=use_ieee(x.dtype),
            BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GT=tile_run(w.g, cfg.bk), U=unit)
    return y.reshape(*shape[:-1], N)
