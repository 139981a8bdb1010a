"""Q4_0 GEMV: the per-row kernel vs the 16-row groups levante regroups Q4_0 into at load (Q4_0x16Weight).

    python benchmarks/q4_0_interleaved.py [--out benchmarks/results/q4_0_interleaved.md]

The per-row kernel (`levante/quant/kernels.py`, `K_q4p::run2`, used for Q4_0 weights whose row count is
not a multiple of 16) reads each row's 18-byte blocks and spends most of its instructions per 32
weights on unpacking codes and applying that row's block scale. Q4_0x16 stores, per group of 16 rows
and per 32-column block, the 16 f16 scales (32 bytes) then the 16 rows' codes (256 bytes) — the same
288 bytes — with each row's codes in one int32 lane, nibbles ordered so that one AND (and a shift)
yields the int16 pairs (c0, c1), (c2, c3), ... of all 16 rows: `vpdpwssd` with a broadcast int16 pair of
x works on 16 rows at once, and the block scales are one vector (16 rows) per block instead of one per
row. x is rounded to int16 per 32-block in both (same error rule); the check below compares with the
exact GGML dequantization.

Prints and writes a table: GB/s of weight bytes read, M = 1, 48 matrices 3584 x 1024 (DRAM-resident),
best of 4 passes, four alternating rounds per thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent))

from test_kernels import make_raw, reference  # noqa: E402

from levante.quant import kernels as kq  # noqa: E402


def best_time(f, passes: int = 4) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "q4_0_interleaved.md"))
    args = ap.parse_args()
    cur = kq.extension()
    if cur is None or kq.decode_ext() is None:
        sys.exit("levante's C++ extension (AVX512_BF16 build) is not available on this machine")
    n, k, x16 = 3584, 1024, kq.X16_ID
    raw = make_raw("Q4_0", n, k, seed=3)
    x = torch.randn(1, k)
    w = reference(raw, "Q4_0").double()
    y = cur.gemv(cur.repack_q4_0x16(torch.from_numpy(raw), k), x16, k, x).double()[0]
    err = float(((y - (x.double() @ w.T)[0]).abs() / (x.double().abs() @ w.abs().T)[0]).max())
    raws = [torch.from_numpy(make_raw("Q4_0", n, k, seed=i)) for i in range(48)]
    packed = [cur.repack_q4_0x16(r, k) for r in raws]
    nbytes = raws[0].numel() * len(raws)
    tid = kq.QTYPES["Q4_0"][0]
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(4):
            t_cur = best_time(lambda: [cur.gemv(r, tid, k, x) for r in raws])  # noqa: B023
            t_new = best_time(lambda: [cur.gemv(p, x16, k, x) for p in packed])  # noqa: B023
            rows.append((threads, nbytes / t_cur / 1e9, nbytes / t_new / 1e9))
            print(rows[-1], flush=True)
    text = ["# Q4_0 GEMV: per-row kernel vs 16-row groups (Q4_0x16)", "",
            f"M = 1, 48 matrices {n} x {k} (DRAM-resident), GB/s of Q4_0 bytes; Q4_0x16's max error "
            f"{err:.1e} of sum |x||w| (rule 1e-3).", "",
            "| threads | per-row (K_q4p::run2) GB/s | Q4_0x16 GB/s | ratio |", "|---|---|---|---|"]
    text += [f"| {t} | {a:.1f} | {b:.1f} | {b / a:.2f}x |" for t, a, b in rows]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
