"""Micro-benchmark of CPU matmul candidates for GGML weights: `python benchmarks/ggml_kernels.py [threads] [--quick]`.

`python benchmarks/ggml_kernels.py --dram` times M = 1 `ext.gemv` with DRAM-resident weights (software
prefetch off / on, 1 and 2 threads).

`python benchmarks/ggml_kernels.py [threads] --gemv [--baseline OLD.so]` only times the small-batch kernel
(`ext.gemv`, M = 1, 2, 4, 8) per type and shape, optionally next to another build of the extension
(e.g. an older `levante_ext_<hash>.so` from ~/.cache/levante/torch_extensions), and `fused_matmul`
against separate calls.

Prints a markdown table: op, shape (K x N), batch M, ms (best of several runs), GB/s (weight bytes
read per call / time), GFLOP/s (2·M·N·K / time). The weight of one shape is re-read every call, so
decode numbers for weights < L3 (32 MiB here) are cache-resident, not DRAM, bandwidth.
"""
# ruff: noqa: B023  (every lambda is timed right where it is made)

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from levante.quant import kernels as kq
from levante.quant.ggml import GGMLWeight

A = torch.ops.aten
SHAPES = [(1024, 3584), (3584, 1024), (576, 1536)]  # (K = in_features, N = out_features)


def bench(f, budget: float = 0.6, reps: int = 20) -> float:
    f()
    ts: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
        if sum(ts) > budget and len(ts) >= 3:
            break
    return min(ts)


def ggml_raw(qtype: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    _, bs, ts = kq.QTYPES[qtype]
    raw = rng.integers(0, 256, (n, k // bs, ts), dtype=np.uint8)
    return torch.from_numpy(raw.reshape(n, -1))


def cold(make, call, nbytes: int, total: int = 160 << 20) -> float:
    """Seconds per call when cycling through enough weight copies (> 4x L3) that they stream from DRAM."""
    ws = [make() for _ in range(max(2, total // nbytes))]
    for w in ws:
        call(w)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for w in ws:
            call(w)
        best = min(best, (time.perf_counter() - t0) / len(ws))
    return best


def cold_decode(add_row, rng) -> None:
    k, n = 1024, 3584
    x = torch.randn(1, k)
    xb = x.bfloat16()
    szb = torch.rand(k // 32, n, 2).bfloat16()
    s8 = torch.rand(n).bfloat16()
    cases = [
        ("F.linear f32", lambda: torch.randn(n, k), lambda w: F.linear(x, w), n * k * 4),
        ("F.linear bf16", lambda: torch.randn(n, k).bfloat16(), lambda w: F.linear(xb, w), n * k * 2),
        (
            "int4pack_mm bf16 (g32)",
            lambda: A._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1),
            lambda p: A._weight_int4pack_mm_for_cpu(xb, p, 32, szb),
            n * k // 2 + szb.numel() * 2,
        ),
        (
            "int8pack_mm bf16",
            lambda: torch.randint(-128, 127, (n, k), dtype=torch.int8),
            lambda w: A._weight_int8pack_mm(xb, w, s8),
            n * k,
        ),
    ]
    for qt in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"):
        nb = n * (k // kq.QTYPES[qt][1]) * kq.QTYPES[qt][2]
        cases.append(
            (
                f"GGMLKernelWeight {qt}",
                lambda qt=qt: kq.GGMLKernelWeight(ggml_raw(qt, n, k, rng), qt, n, k),
                lambda w: w.matmul(x),
                nb,
            )
        )
    for name, make, call, nbytes in cases:
        t = cold(make, call, nbytes)
        add_row(f"{name} [DRAM]", k, n, 1, t, nbytes)


GEMV_CASES = [  # (type, N = out, K = in): SmolLM2-135M (Q4_1 / Q8_0 files), 1.5B-class Q4_0 / Q4_K_M
    ("Q4_1", 1536, 576),
    ("Q4_1", 576, 1536),
    ("Q4_1", 576, 576),
    ("Q4_1", 192, 576),
    ("Q8_0", 49152, 576),
    ("Q8_0", 3584, 1024),
    ("Q4_0", 3584, 1024),
    ("Q4_0", 1024, 3584),
    ("Q4_K", 3584, 1024),
    ("Q5_K", 3584, 1024),
    ("Q6_K", 3584, 1024),
    ("Q6_K", 1024, 3584),
]


def load_so(path: str):
    import importlib.util

    name = path.rsplit("/", 1)[-1].split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gemv_main(threads: int, baseline: str | None) -> None:
    """GB/s (weight bytes / time, best of several calls; weights re-read from cache when they fit L3)."""
    torch.set_num_threads(threads)
    ext = kq.extension()
    exts = [("new", ext)] + ([("base", load_so(baseline))] if baseline else [])
    rng = np.random.default_rng(0)
    print(f"threads={threads}; GB/s of weights per call, M = 1 / 2 / 4 / 8")
    print("| type | N x K | build | M=1 us | M=1 | M=2 | M=4 | M=8 |\n|---|---|---|---|---|---|---|---|")
    for qt, n, k in GEMV_CASES:
        raw = ggml_raw(qt, n, k, rng)
        for name, e in exts:
            cells, t1 = [], 0.0
            for m in (1, 2, 4, 8):
                x = torch.randn(m, k)
                t = bench(lambda: e.gemv(raw, kq.QTYPES[qt][0], k, x), budget=0.3, reps=200)
                t1 = t if m == 1 else t1
                cells.append(f"{raw.numel() / t / 1e9:.1f}")
            print(f"| {qt} | {n}x{k} | {name} | {t1 * 1e6:.0f} | " + " | ".join(cells) + " |", flush=True)
    print("\nfused_matmul vs separate matmul calls (us, M = 1)\n| weights | separate | fused |\n|---|---|---|")
    groups = {
        "SmolLM2 q/k/v Q4_1 (576+192+192)x576": [("Q4_1", 576, 576), ("Q4_1", 192, 576), ("Q4_1", 192, 576)],
        "SmolLM2 gate/up Q4_1 2x1536x576": [("Q4_1", 1536, 576), ("Q4_1", 1536, 576)],
        "Q4_K_M q/k/v (1024+256+256)x1024 Q4_K,Q4_K,Q6_K": [
            ("Q4_K", 1024, 1024),
            ("Q4_K", 256, 1024),
            ("Q6_K", 256, 1024),
        ],
        "gate/up Q4_0 2x3584x1024": [("Q4_0", 3584, 1024), ("Q4_0", 3584, 1024)],
    }
    for label, specs in groups.items():
        ws = [kq.GGMLKernelWeight(ggml_raw(qt, n, k, rng), qt, n, k) for qt, n, k in specs]
        x = torch.randn(1, specs[0][2])
        t_sep = bench(lambda: [w.matmul(x) for w in ws], budget=0.3, reps=200)
        t_fus = bench(lambda: kq.fused_matmul(ws, x), budget=0.3, reps=200)
        print(f"| {label} | {t_sep * 1e6:.0f} | {t_fus * 1e6:.0f} |", flush=True)


def ggml_raw_sane(qtype: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Random codes with finite, small f16 scales (0x20xx), so no inf / NaN reaches the timing."""
    _, bs, ts = kq.QTYPES[qtype]
    raw = rng.integers(0, 256, (n, k // bs, ts), dtype=np.uint8)
    hi = {"Q4_0": [1], "Q4_1": [1, 3], "Q8_0": [1], "Q4_K": [1, 3], "Q5_K": [1, 3], "Q6_K": [209]}
    for i in hi.get(qtype, []):
        raw[..., i] = 0x20
    return torch.from_numpy(raw.reshape(n, -1))


def dram_main() -> None:
    """M = 1 `ext.gemv` with the weight streamed from DRAM: cycles through >= 160 MiB of distinct copies.

    Columns: software prefetch off (`set_pf(0)`) / on (the default distance), 1 and 2 threads.
    """
    ext = kq.extension()
    rng = np.random.default_rng(0)
    pf_default = ext.set_pf(0)
    ext.set_pf(pf_default)
    print(f"M = 1, DRAM-resident weights; GB/s = weight bytes / time; prefetch distance {pf_default} B")
    print("| type | K x N | 1 thr, pf off | 1 thr, pf on | 2 thr, pf off | 2 thr, pf on |\n|---|---|---|---|---|---|")
    for qt in ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0"):
        for k, n in ((1024, 3584), (3584, 1024), (1024, 1024)):
            w0 = ggml_raw_sane(qt, n, k, rng)
            ws = [w0] + [w0.clone() for _ in range(max(4, (160 << 20) // w0.numel()) - 1)]
            x = torch.randn(1, k)
            qid = kq.QTYPES[qt][0]
            cells = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for pf in (0, pf_default):
                    ext.set_pf(pf)
                    for w in ws:
                        ext.gemv(w, qid, k, x)
                    best = float("inf")
                    for _ in range(5):
                        t0 = time.perf_counter()
                        for w in ws:
                            ext.gemv(w, qid, k, x)
                        best = min(best, (time.perf_counter() - t0) / len(ws))
                    cells.append(f"{w0.numel() / best / 1e9:.1f}")
            ext.set_pf(pf_default)
            print(f"| {qt} | {k}x{n} | " + " | ".join(cells) + " |", flush=True)
            del ws


def main() -> None:
    threads = int(next((a for a in sys.argv[1:] if a.isdigit()), 2))
    quick = "--quick" in sys.argv
    if "--dram" in sys.argv:
        dram_main()
        return
    if "--gemv" in sys.argv:
        base = sys.argv[sys.argv.index("--baseline") + 1] if "--baseline" in sys.argv else None
        gemv_main(threads, base)
        return
    torch.set_num_threads(threads)
    kq.extension()  # build (or load) before timing
    rng = np.random.default_rng(0)
    batches = [1, 8, 128] if quick else [1, 8, 16, 128, 512]
    rows = []

    def add(op, k, n, m, fn, nbytes, t=None):
        t = bench(fn) if t is None else t
        rows.append((op, f"{k}x{n}", m, t * 1e3, nbytes / t / 1e9, 2 * m * n * k / t / 1e9))
        r = rows[-1]
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.2f} | {r[5]:.1f} |", flush=True)

    print(f"threads={threads}, torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    print("| op | K x N | M | ms | GB/s | GFLOP/s |\n|---|---|---|---|---|---|")
    cold_decode(lambda op, k, n, m, t, nb: add(op, k, n, m, None, nb, t), rng)
    for k, n in SHAPES:
        w = torch.randn(n, k)
        wb = w.bfloat16()
        q4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
        p4 = A._convert_weight_to_int4pack_for_cpu(q4, 1)
        w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8)
        weights = {}
        for qt in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"):
            if k % kq.QTYPES[qt][1] == 0:
                weights[qt] = kq.GGMLKernelWeight(ggml_raw(qt, n, k, rng), qt, n, k)
        torch_path = GGMLWeight(weights["Q4_0"].data, "Q4_0", (n, k))
        for m in batches:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            add("F.linear f32", k, n, m, lambda: F.linear(x, w), n * k * 4)
            add("F.linear bf16", k, n, m, lambda: F.linear(xb, wb), n * k * 2)
            szb = torch.rand(k // 32, n, 2).bfloat16()
            add(
                "int4pack_mm bf16 (g32)",
                k,
                n,
                m,
                lambda: A._weight_int4pack_mm_for_cpu(xb, p4, 32, szb),
                n * k // 2 + szb.numel() * 2,
            )
            if m == 1:  # the float32 paths are a slow reference loop; 128 rows take seconds
                szf = szb.float()
                add(
                    "int4pack_mm f32 (g32)",
                    k,
                    n,
                    m,
                    lambda: A._weight_int4pack_mm_for_cpu(x, p4, 32, szf),
                    n * k // 2 + szf.numel() * 4,
                )
                add("int8pack_mm f32", k, n, m, lambda: A._weight_int8pack_mm(x, w8, torch.rand(n)), n * k)
            add("int8pack_mm bf16", k, n, m, lambda: A._weight_int8pack_mm(xb, w8, torch.rand(n).bfloat16()), n * k)
            if m <= 16:
                add("torch GGMLWeight Q4_0 (tile dequant)", k, n, m, lambda: torch_path.matmul(x), torch_path.nbytes)
            for qt, wq in weights.items():
                add(f"GGMLKernelWeight {qt}", k, n, m, lambda wq=wq: wq.matmul(x), wq.nbytes)
                if m in (8, 16):
                    qid = kq.QTYPES[qt][0]
                    ext = kq.extension()
                    if ext is not None:
                        add(
                            f"  fused gemv {qt}",
                            k,
                            n,
                            m,
                            lambda wq=wq, qid=qid: ext.gemv(wq.data, qid, k, x),
                            wq.nbytes,
                        )
                        add(
                            f"  dequant+linear {qt}",
                            k,
                            n,
                            m,
                            lambda wq=wq, qid=qid: F.linear(x, ext.dequant(wq.data, qid, k)),
                            wq.nbytes,
                        )


if __name__ == "__main__":
    main()
