"""Quantization vs low-rank: RTN 4-bit, AWQ 4-bit, GGUF Q4_K_M, low-rank 20% + Q4_K_M, per model.

Same models, baselines, text, chunking and calibration as benchmarks/compression.py (SmolLM2-135M: the
embedded Q4_1 GGUF dequantized to float32, n_ctx 512, chunks from the second half of the text; the tiny
Mixtral trained on Genesis: n_ctx 256, chunks of the held-out Exodus). Appends a table to
benchmarks/results/compression.md. The low-rank + Q4_K_M rows use the factorised GGUF (A / B factors
as separate quantized tensors, levante-only) and, for comparison, `--expand-low-rank` (B @ A written as
full matrices, the file llama.cpp can load).

    python benchmarks/quant_table.py [--models smollm2,mixtral]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compression import Model, parse_and_setup  # noqa: E402

from levante.loader import read_checkpoint  # noqa: E402
from levante.tools.awq import awq_quantize  # noqa: E402
from levante.tools.compress import compress_model  # noqa: E402
from levante.tools.quantize import quantize_model  # noqa: E402


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def n_params(path: Path) -> int:
    """Parameters stored in a checkpoint (factor pairs count r * (in + out); AWQ counts as the float weights)."""
    ck = read_checkpoint(path)
    return sum(int(getattr(w, "n_params", None) or w.numel()) for w in ck.weights.values())


def variants(m: Model, tmp: Path, rows: list) -> None:
    base_params = n_params(m.src)

    def variant(name: str, make) -> None:
        t0 = time.perf_counter()
        out = make()
        secs = time.perf_counter() - t0
        rep = m.compare(out)
        removed = base_params - n_params(out)
        rows.append((m.name, name, removed, base_params, size_of(out), rep, secs))
        print(m.name, name, removed, f"{size_of(out) / 2**20:.1f} MiB", rep["ppl_other"], rep["kl_mean"], flush=True)

    k, g = m.key, m.awq_group
    calib = m.calib_ids[:1024]
    variant("GGUF Q4_K_M (levante quantize)",
            lambda: quantize_model(m.src, tmp / f"{k}-q4km.gguf", "Q4_K_M", progress=False))
    variant(f"RTN 4-bit g{g} (AWQ layout, no search)",
            lambda: awq_quantize(m.src, tmp / f"{k}-rtn", calib, group_size=g, n_grid=1, clip=False,
                                 seq_len=m.n_ctx))
    variant(f"AWQ 4-bit g{g}", lambda: awq_quantize(m.src, tmp / f"{k}-awq", calib, group_size=g, n_grid=20,
                                                   seq_len=m.n_ctx))
    def lowrank_q4km(expand: bool, multiple: int = 1) -> Path:
        lr = tmp / f"{k}-lowrank20-m{multiple}"
        if not lr.exists():
            compress_model(m.src, lr, ratio=0.2, calib_ids=m.calib_ids, calib_ctx=m.n_ctx, rank_multiple=multiple)
        return quantize_model(lr, tmp / f"{k}-lowrank20-m{multiple}-q4km{'-x' if expand else ''}.gguf", "Q4_K_M",
                              progress=False, expand_low_rank=expand)

    variant("low-rank 20% (activation-aware) + Q4_K_M, factorised GGUF", lambda: lowrank_q4km(False))
    variant("low-rank 20% (activation-aware, --rank-multiple 32) + Q4_K_M, factorised GGUF",
            lambda: lowrank_q4km(False, 32))
    variant("low-rank 20% (activation-aware) + Q4_K_M, --expand-low-rank", lambda: lowrank_q4km(True))


def main() -> None:
    args, models = parse_and_setup()
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            variants(m, Path(tmp), rows)
    sources = "; ".join(f"{m.name}: source {size_of(m.src) / 2**20:.1f} MiB, {m.eval_desc}" for m in models)
    lines = [
        "", "## Quantization and low-rank + quantization on the same baselines", "",
        f"Produced by `benchmarks/quant_table.py` (one thread; same baselines, text and calibration as above; "
        f"{sources}). Params removed = parameters of the original minus those stored in the output (quantized "
        "weights count as their float shape). SmolLM2's rows of 576 are not multiples of 256, so Q4_K_M falls "
        "back to 32-block types for those tensors exactly as llama.cpp does, and AWQ uses group 64 (576 is not a "
        "multiple of 128). The Mixtral has 8 experts, so Q4_K_M keeps attn_k / attn_v in Q8_0 and attn_output "
        "in Q5_K (llama.cpp's rules). `levante quantize` of a low-rank directory writes each factored matrix as "
        "two quantized tensors (A [r, in], B [out, r]; the rank zero-padded to a multiple of 32, B in llama.cpp's "
        "fallback type Q5_0 / Q8_0 when the rank is not a multiple of 256), so the factorised rows keep the "
        "savings in the file, less the rank padding; `levante compress --rank-multiple 32` chooses ranks that "
        "need no padding (its row: the whole 20% budget stays removed in the file). llama.cpp cannot load "
        "factorised files; the `--expand-low-rank` rows show the llama.cpp-loadable alternative (B @ A as full "
        "matrices: the same model up to quantization, no savings).", "",
        "| model | method | params removed | file MiB | PPL original | PPL | KL | top-1 | time s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, name, removed, total, size, rep, secs in rows:
        lines.append(f"| {model} | {name} | {removed:,} ({100 * removed / total:.1f}%) | {size / 2**20:.1f} | "
                     f"{rep['ppl_base']:.4f} | {rep['ppl_other']:.4f} +/- {rep['ppl_other_err']:.4f} | "
                     f"{rep['kl_mean']:.4f} | {100 * rep['top1_agreement']:.1f}% | {secs:.0f} |")
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
