"""Perplexity of float vs RTN 4-bit vs AWQ 4-bit on SmolLM2-135M; writes benchmarks/results/awq.md.

The "float" model is SmolLM2-135M-Instruct's weights dequantized from the embedded Q4_1 GGUF (the
only copy available offline), held in float32. RTN and AWQ are written by `levante.tools.awq.awq_quantize`
(RTN = n_grid 1, no clipping: alpha = 0 so s = 1) and read back by levante's HF reader. SmolLM2's
hidden size 576 is not a multiple of 128, so the group size is 64 (AutoAWQ would refuse g128 too).
Text: data/kjv_genesis_exodus.txt when present (else tests/data/oracle_text.txt); calibration on the
first tokens, evaluation on a disjoint later stretch, in windows of 512 tokens.

    python benchmarks/awq_vs_rtn.py [--calib-tokens 1024] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from levante.loader import load, read_checkpoint  # noqa: E402
from levante.quant.awq import rtn_weight  # noqa: E402
from levante.tools.awq import awq_quantize  # noqa: E402
from tests.fixtures import smollm2_gguf  # noqa: E402


def perplexity(model, ids: list[int], window: int = 512) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[s : s + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1])[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def matmul_speed(out_f: int = 4096, in_f: int = 4096, rows: Sequence[int] = (1, 8, 128), reps: int = 5) -> list[str]:
    """Time AWQWeight.matmul vs dense F.linear on the dequantized weight (float32); returns table lines."""
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.02
    aw = rtn_weight(w, 128)
    dense = aw.dequantize()
    lines = ["| rows | AWQWeight.matmul ms | dense F.linear ms |", "|---|---|---|"]
    for n in rows:
        x = torch.randn(n, in_f)
        res = []
        for f in (lambda x=x: aw.matmul(x), lambda x=x: F.linear(x, dense)):
            f()
            t = time.perf_counter()
            for _ in range(reps):
                f()
            res.append((time.perf_counter() - t) / reps * 1e3)
        lines.append(f"| {n} | {res[0]:.2f} | {res[1]:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "awq.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    gguf = smollm2_gguf()
    text_path = ROOT / "data" / "kjv_genesis_exodus.txt"
    if not text_path.is_file():
        text_path = ROOT / "tests" / "data" / "oracle_text.txt"
    tok = read_checkpoint(gguf).tokenizer
    ids = tok.encode(text_path.read_text(encoding="utf-8"))
    calib = ids[: args.calib_tokens]
    held = ids[len(ids) // 2 :][: args.eval_tokens]  # disjoint from the calibration prefix
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        rows.append(("float (Q4_1 GGUF dequantized, f32)", perplexity(load(gguf, dtype="float32").model, held), 0.0))
        for name, kw in (("RTN 4-bit", dict(n_grid=1, clip=False)), ("AWQ 4-bit", dict(n_grid=20))):
            t = time.time()
            out = awq_quantize(gguf, Path(tmp) / name.split()[0], calib, group_size=args.group_size, **kw)
            dt = time.time() - t
            rows.append((f"{name} g{args.group_size}", perplexity(load(out).model, held), dt))
            print(rows[-1], flush=True)
    lines = [
        "# AWQ vs round-to-nearest (SmolLM2-135M-Instruct)", "",
        f"Text: `{text_path.relative_to(ROOT)}`; calibration: first {len(calib)} tokens; evaluation: "
        f"{len(held)} tokens from the second half, windows of 512. Produced by `benchmarks/awq_vs_rtn.py`.", "",
        "| weights | perplexity | quantize time (s) |", "|---|---|---|",
        *[f"| {n} | {p:.3f} | {d:.0f} |" for n, p, d in rows], "",
        "## AWQWeight.matmul speed (4096x4096, g128, float32, 2 threads)", "", *matmul_speed(), "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
