"""GGML GEMV: the per-row kernels vs the 16-row groups levante regroups Q4_0 / Q4_K / Q6_K into at load.

    python benchmarks/grouped16.py [--types Q4_0,Q4_K,Q6_K] [--out benchmarks/results/grouped16.md]

The per-row kernels (`levante/quant/kernels.py`: `K_q4p::run2`, `K_q45_k`, `K_q6_k`) read one row's GGML
blocks at a time and spend most of their instructions per 32 weights on unpacking codes and applying
that row's scales (the K types: a `vpmullw` of every 32 codes by their sub-block scale). The grouped
layouts (`Grouped16Weight`) store, per group of 16 rows and per column block, the same bytes moved so
that one int32 lane holds one row: `vpdpwssd` with a broadcast int16 pair of x works on 16 rows at once,
a sub-block's integer sums of 16 rows are exact in int32, and the scales are applied in f32 as one
vector per 16 rows. x is rounded to int16 in both (same error rule); the check compares with the exact
GGML dequantization.

Part 1, decode: GB/s of weight bytes read, M = 1, 48 matrices 3584 x 1024 (DRAM-resident), best of 4
passes, alternating rounds per thread count.
Part 2, compute: the same at 1 thread on one 256 x 1024 matrix that stays in L2 (500 calls per timing,
best of 5): the kernels' own speed, free of this VM's memory speed, which moved 2x within an hour.
Part 3, prefill: ms per 3584 x 1024 matmul at M = 64 / 128 / 512 rows of x, 2 threads: the grouped
kernel (x in chunks of 64 rows) vs dequantized tiles + MKL (what the per-row types do above 64 rows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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
    ap.add_argument("--types", default="Q4_0,Q4_K,Q5_K,Q6_K,Q8_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results" / "grouped16.md"))
    args = ap.parse_args()
    ext = kq.extension()
    if ext is None or kq.decode_ext() is None:
        sys.exit("levante's C++ extension (AVX512_BF16 build) is not available on this machine")
    n, k = 3584, 1024
    decode, compute, prefill = [], [], []
    for qt in args.types.split(","):
        tid, gid = kq.QTYPES[qt][0], kq.GROUPED_IDS[qt]
        raw = make_raw(qt, n, k, seed=3)
        x = torch.randn(1, k)
        w = reference(raw, qt).double()
        y = ext.gemv(ext.regroup_rows(torch.from_numpy(raw), gid, k), gid, k, x).double()[0]
        err = float(((y - (x.double() @ w.T)[0]).abs() / (x.double().abs() @ w.abs().T)[0]).max())
        raws = [torch.from_numpy(make_raw(qt, n, k, seed=i)) for i in range(48)]
        grouped = [ext.regroup_rows(r, gid, k) for r in raws]
        nbytes = raws[0].numel() * len(raws)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for _ in range(args.rounds):
                t_row = best_time(lambda: [ext.gemv(r, tid, k, x) for r in raws])  # noqa: B023
                t_grp = best_time(lambda: [ext.gemv(g, gid, k, x) for g in grouped])  # noqa: B023
                decode.append((qt, threads, nbytes / t_row / 1e9, nbytes / t_grp / 1e9, err))
                print(decode[-1], flush=True)
        torch.set_num_threads(1)
        small = torch.from_numpy(make_raw(qt, 256, k, seed=7))
        small_g = ext.regroup_rows(small, gid, k)
        t_row = best_time(lambda: [ext.gemv(small, tid, k, x) for _ in range(500)], 5)  # noqa: B023
        t_grp = best_time(lambda: [ext.gemv(small_g, gid, k, x) for _ in range(500)], 5)  # noqa: B023
        compute.append((qt, small.numel() * 500 / t_row / 1e9, small.numel() * 500 / t_grp / 1e9))
        print(compute[-1], flush=True)
        torch.set_num_threads(2)
        r0, g0 = raws[0], grouped[0]
        buf = torch.empty(n * k)
        for m in (64, 128, 512):
            xm = torch.randn(m, k)
            t_grp = best_time(lambda: ext.gemv(g0, gid, k, xm))  # noqa: B023
            t_tile = best_time(lambda: F.linear(xm, ext.dequant_into(r0, tid, k, buf)))  # noqa: B023
            prefill.append((qt, m, t_grp * 1e3, t_tile * 1e3))
            print(prefill[-1], flush=True)
    text = ["# GGML GEMV: per-row kernels vs 16-row groups (Grouped16Weight)", "",
            f"Decode: M = 1, 48 matrices {n} x {k} (DRAM-resident), GB/s of the type's bytes, best of 4 passes; "
            "max error of the grouped kernel as a fraction of sum |x||w| (rule 1e-3).", "",
            "| type | threads | per-row GB/s | grouped GB/s | ratio | grouped max error |", "|---|---|---|---|---|---|"]
    text += [f"| {q} | {t} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {e:.1e} |" for q, t, a, b, e in decode]
    text += ["", "Compute: M = 1, 1 thread, one 256 x 1024 matrix resident in L2, GB/s of the type's bytes.", "",
             "| type | per-row GB/s | grouped GB/s | ratio |", "|---|---|---|---|"]
    text += [f"| {q} | {a:.1f} | {b:.1f} | {b / a:.2f}x |" for q, a, b in compute]
    text += ["", f"Prefill: one {n} x {k} matmul, 2 threads, ms (best of 4).", "",
             "| type | rows of x | grouped kernel | tile dequant + MKL | ratio |", "|---|---|---|---|---|"]
    text += [f"| {q} | {m} | {a:.2f} | {b:.2f} | {b / a:.2f}x |" for q, m, a, b in prefill]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
