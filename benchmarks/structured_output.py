"""Decode speed with and without a JSON-schema constraint, batch 1 and 8, side by side in one run.

    python benchmarks/structured_output.py [-n 128] [-r 3] [-t 2] [--model PATH]

Default model: the embedded SmolLM2-135M-Instruct (Q4_1), 2 threads. Both sides generate exactly n tokens per
row: the constrained rows follow a JSON schema whose shortest valid output is longer than n (an array of at
least 1000 strings, so the grammar never ends early), the free rows ignore EOS. The constrained side pays for
the mask of every row every step (xgrammar fill + apply) and the accept after it. Reps interleave the two.
Writes benchmarks/results/structured_output.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from levante import LLM
from levante.generate import generate
from levante.grammar import Grammar
from levante.sampling import SamplingParams

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1000}
PROMPT = "List some fruits as a JSON array of strings:"


def run(llm: LLM, batch: int, n: int, constrained: bool, seed: int) -> float:
    ids = [llm.tokenize(PROMPT)] * batch
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=seed + i)
              for i in range(batch)]
    cons = [llm.grammar_compiler().constraint(Grammar.json_schema(SCHEMA)) for _ in ids] if constrained else None
    with llm.using_threads():
        t0 = time.perf_counter()
        out = generate(llm.model, llm.tokenizer, ids, n, params, stop_token_ids=set(), constraints=cons)
        dt = time.perf_counter() - t0
    assert all(len(r.tokens) == n for r in out), [len(r.tokens) for r in out]
    return batch * n / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "structured_output.md"))
    args = ap.parse_args()
    llm = LLM(args.model, n_ctx=1024, n_threads=args.threads)
    llm.grammar_compiler().compile(Grammar.json_schema(SCHEMA))
    run(llm, 1, 8, True, 0)  # warm-up
    rows = ["| batch | free tok/s | JSON-schema tok/s | constrained / free |", "|---|---|---|---|"]
    for batch in (1, 8):
        free, cons = [], []
        for r in range(args.reps):
            free.append(run(llm, batch, args.n, False, r))
            cons.append(run(llm, batch, args.n, True, r))
        ratios = [c / f for c, f in zip(cons, free)]
        rows.append(f"| {batch} | {statistics.median(free):.1f} | {statistics.median(cons):.1f} | "
                    f"{statistics.median(ratios):.3f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Structured output: decode speed with and without a JSON-schema constraint", "",
        f"`python benchmarks/structured_output.py` ({llm.model_name}, {args.threads} threads, {args.n} new tokens "
        f"per row, temperature 1, median of {args.reps} interleaved reps; ratio = median of per-rep ratios; "
        f"torch {torch.__version__}).", "", *rows, ""])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
