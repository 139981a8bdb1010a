"""Quantization vs low-rank on SmolLM2: RTN 4-bit, AWQ 4-bit, GGUF Q4_K_M, low-rank 20% + Q4_K_M.

Same baseline, text and chunking as benchmarks/compression.py (the embedded Q4_1 GGUF dequantized to
float32; n_ctx 512; chunks from the second half of data/kjv_genesis_exodus.txt; calibration on the
first tokens). Appends a table to benchmarks/results/compression.md.

    python benchmarks/quant_table.py [--chunks 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compression import Cached  # noqa: E402

from levante import LLM  # noqa: E402
from levante.compress import compress_model  # noqa: E402
from levante.loader import load  # noqa: E402
from levante.quality import compare  # noqa: E402
from levante.quant.awq import awq_quantize  # noqa: E402
from levante.quantize import quantize_model  # noqa: E402


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compression.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from fixtures import smollm2_gguf

    src = smollm2_gguf()
    text = (ROOT / "data" / "kjv_genesis_exodus.txt").read_text()
    base_llm = LLM(str(src), n_ctx=args.ctx, dtype="float32")
    base = Cached(base_llm)
    ids = base_llm.tokenize(text)
    calib, eval_ids = ids[: args.calib_tokens], ids[len(ids) // 2 :]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def variant(name: str, make) -> None:
            t0 = time.perf_counter()
            out = make()
            secs = time.perf_counter() - t0
            loaded = load(out)
            loaded.tokenizer = base_llm.tokenizer  # AWQ dirs made from a GGUF carry no tokenizer files
            other = LLM(n_ctx=args.ctx, _loaded=loaded)
            rep = compare(base, other, eval_ids, args.ctx, n_chunks=args.chunks, progress=False)
            rows.append((name, size_of(out), rep, secs))
            print(name, f"{size_of(out) / 2**20:.1f} MiB", rep["ppl_other"], rep["kl_mean"], flush=True)

        variant("GGUF Q4_K_M (levante quantize)", lambda: quantize_model(src, tmp / "q4km.gguf", "Q4_K_M",
                                                                         progress=False))
        variant("RTN 4-bit g64 (AWQ layout, no search)",
                lambda: awq_quantize(src, tmp / "rtn", calib[:1024], group_size=64, n_grid=1, clip=False))
        variant("AWQ 4-bit g64", lambda: awq_quantize(src, tmp / "awq", calib[:1024], group_size=64, n_grid=20))

        def lowrank_q4km() -> Path:
            lr = tmp / "lowrank20"
            compress_model(src, lr, ratio=0.2, calib_ids=calib, calib_ctx=args.ctx)
            return quantize_model(lr, tmp / "lowrank20-q4km.gguf", "Q4_K_M", progress=False)

        variant("low-rank 20% (activation-aware) + Q4_K_M", lowrank_q4km)
    base_size = src.stat().st_size
    lines = [
        "", "## Quantization on the same baseline (SmolLM2-135M)", "",
        f"Produced by `benchmarks/quant_table.py` ({args.chunks} chunks, n_ctx {args.ctx}; same baseline and text as "
        f"above; the source Q4_1 GGUF is {base_size / 2**20:.1f} MiB). SmolLM2's rows of 576 are not multiples of "
        "256, so Q4_K_M falls back to 32-block types for those tensors exactly as llama.cpp does, and AWQ uses group "
        "64 (576 is not a multiple of 128). `levante quantize` of a low-rank directory re-expands B @ A into full "
        "matrices (GGUF has no factorised tensor), so that row shows the combined quality loss but saves no "
        "parameters in the file.", "",
        "| method | file MiB | PPL original | PPL | KL | top-1 | time s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size, rep, secs in rows:
        lines.append(f"| {name} | {size / 2**20:.1f} | {rep['ppl_base']:.4f} | {rep['ppl_other']:.4f} +/- "
                     f"{rep['ppl_other_err']:.4f} | {rep['kl_mean']:.4f} | {100 * rep['top1_agreement']:.1f}% | "
                     f"{secs:.0f} |")
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
