"""Speculative decoding, side by side in one run: levante with / without prompt lookup and with a draft model,
and llama-cpp-python with / without its LlamaPromptLookupDecoding, on the same prompts and files.

    python benchmarks/speculative.py [-n 256] [-r 3] [-t 2] [-k 8] [--no-llama]

Model: the embedded SmolLM2-135M-Instruct (Q4_1). Prompt lookup on copy-heavy work (repeat a ~300-token
passage, lightly edit it, rename a variable in code) and on free generation (nothing to look up). Draft model:
the target is SmolLM2 in F16 (`levante quantize --type F16` of the shipped file: its dequantized weights), the
drafts the shipped Q4_1 and a Q2_K of the F16, on ordinary chat prompts. Greedy decoding, at most n new tokens
(EOS ends earlier; both sides generate the same tokens: greedy speculation is exact, checked). Reps interleave
the variants; ratios are medians of per-rep ratios. Writes benchmarks/results/speculative.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import smollm2_gguf  # noqa: E402

from levante import LLM  # noqa: E402
from levante.tools.quantize import quantize_model  # noqa: E402

PASSAGE = (ROOT / "data" / "kjv_genesis_exodus.txt").read_text()[600:1900]
CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index >= window - 1:
            result.append(total / window)
    return result


def exponential_average(values, alpha):
    """Exponentially weighted average of values with smoothing factor alpha."""
    if not 0 < alpha <= 1:
        raise ValueError("alpha must be in (0, 1]")
    result = []
    current = None
    for value in values:
        current = value if current is None else alpha * value + (1 - alpha) * current
        result.append(current)
    return result
'''
LOOKUP_PROMPTS = {
    "repeat a passage": f"Repeat the following text exactly, word for word.\n\n{PASSAGE}",
    "lightly edit a passage": f"Rewrite the following text, replacing the word 'God' by 'the Lord'. Change nothing "
                              f"else.\n\n{PASSAGE}",
    "edit code": f"Rename the parameter `values` to `data` in this Python code and print the whole code.\n\n"
                 f"```python\n{CODE}```",
    "free generation (no match)": "Write a short story about a dragon who learns to paint.",
}
CHAT_PROMPTS = {
    "explain": "Explain in a few sentences why the sky is blue.",
    "advice": "Give me three tips for learning a new language.",
    "story": "Tell a short story about a lighthouse keeper.",
}


def chat(llm: LLM, text: str) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": text}])


def _timed(chunks) -> tuple[float, float, str]:
    """(decode tok/s: tokens after the first over the time after the first, end-to-end tok/s, text) of a stream
    of completion chunks (one token per chunk for both engines)."""
    t0 = time.perf_counter()
    first = last = None
    parts = []
    for c in chunks:
        now = time.perf_counter()
        first = first or now
        last = now
        parts.append(c["choices"][0]["text"])
    n = len(parts)
    return (n - 1) / (last - first), n / (last - t0), "".join(parts)


def levante_run(llm: LLM, ids: list[int], n: int) -> tuple[float, float, str, dict]:
    dec, e2e, text = _timed(llm.create_completion(ids, max_tokens=n, temperature=0.0, stream=True))
    return dec, e2e, text, (llm.speculative_stats() if llm.spec is not None else {})


def llama_run(model, ids: list[int], n: int) -> tuple[float, float, str]:
    model.reset()
    return _timed(model.create_completion(ids, max_tokens=n, temperature=0.0, top_k=1, stream=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculative.md"))
    args = ap.parse_args()
    src = smollm2_gguf()
    base = LLM(str(src), n_ctx=2048, n_threads=args.threads)
    look = LLM(str(src), n_ctx=2048, n_threads=args.threads, speculative="prompt_lookup",
               num_speculative_tokens=args.k, _loaded=base.loaded)
    llamas = {}
    if not args.no_llama:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        kw = dict(model_path=str(src), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                  verbose=False)
        llamas = {"plain": llama_cpp.Llama(**kw),  # (speculation needs logits_all: each side its own best setting)
                  "lookup": llama_cpp.Llama(**kw, logits_all=True,
                                            draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))}
    lines = ["# Speculative decoding: levante (prompt lookup, draft model) and llama-cpp-python (prompt lookup)", "",
             f"`python benchmarks/speculative.py` (SmolLM2-135M-Instruct Q4_1, {args.threads} threads, greedy, at "
             f"most {args.n} new tokens, K <= {args.k}, median of {args.reps} interleaved reps; ratio = median of "
             "per-rep ratios; torch " + torch.__version__ + ").", "",
             "Decode tok/s: the tokens after the first over the time after the first (what speculation changes; "
             "llama.cpp's eval rate); end-to-end ratios (prompt processing included) in brackets.", "",
             "## Prompt lookup", "",
             "| prompt | tokens | levante tok/s | + lookup tok/s | levante ratio | acceptance | tokens per forward "
             "| llama.cpp tok/s | + lookup tok/s | llama.cpp ratio |", "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(a: list, b: list, i: int) -> float:
        return statistics.median(y[i] / x[i] for x, y in zip(a, b))

    for name, text in LOOKUP_PROMPTS.items():
        ids = chat(base, text)
        res = {"plain": [], "lookup": [], "ll_plain": [], "ll_lookup": []}
        stats = {}
        for _ in range(args.reps):
            *sp, tp, _ = levante_run(base, ids, args.n)
            *sl, tl, stats = levante_run(look, ids, args.n)
            assert tp == tl, f"{name}: speculation changed the greedy output"
            res["plain"].append(sp)
            res["lookup"].append(sl)
            if llamas:
                res["ll_plain"].append(llama_run(llamas["plain"], ids, args.n)[:2])
                res["ll_lookup"].append(llama_run(llamas["lookup"], ids, args.n)[:2])
        n_tok = len(base.tokenize(tp, add_bos=False))
        ll = ("| - | - | -" if not llamas else
              f"| {statistics.median(r[0] for r in res['ll_plain']):.1f} | "
              f"{statistics.median(r[0] for r in res['ll_lookup']):.1f} | "
              f"{ratio(res['ll_plain'], res['ll_lookup'], 0):.2f}x "
              f"({ratio(res['ll_plain'], res['ll_lookup'], 1):.2f}x)")
        lines.append(f"| {name} | {n_tok} | {statistics.median(r[0] for r in res['plain']):.1f} | "
                     f"{statistics.median(r[0] for r in res['lookup']):.1f} | "
                     f"{ratio(res['plain'], res['lookup'], 0):.2f}x ({ratio(res['plain'], res['lookup'], 1):.2f}x) | "
                     f"{stats.get('acceptance', 0):.0%} | {stats.get('tokens_per_forward', 1):.2f} {ll} |")
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        f16 = quantize_model(src, Path(tmp) / "smollm2.F16.gguf", "F16", progress=False)
        target = LLM(str(f16), n_ctx=2048, n_threads=args.threads)
        q2k = quantize_model(f16, Path(tmp) / "smollm2.Q2_K.gguf", "Q2_K", progress=False)
        drafts = {"Q4_1": base, "Q2_K": LLM(str(q2k), n_ctx=2048, n_threads=args.threads)}
        drafted = {name: LLM(str(f16), n_ctx=2048, n_threads=args.threads, draft_model=d,
                             num_speculative_tokens=args.k, _loaded=target.loaded) for name, d in drafts.items()}
        lines += ["", "## Draft model", "",
                  "Target: SmolLM2 F16 (`levante quantize --type F16` of the shipped Q4_1: its dequantized weights); "
                  "drafts: the shipped Q4_1 (close to the target) and `--type Q2_K` of the F16 (further off: "
                  "llama.cpp's Q2_K mix, where SmolLM2's 576-wide rows fall back to Q4_0 and ffn_down is 2/3-bit).",
                  "", "| prompt | tokens | F16 tok/s | " + " | ".join(
                      f"+ {n} draft tok/s | ratio | acceptance | tokens per forward" for n in drafts) + " |",
                  "|---|---|---|" + "---|---|---|---|" * len(drafts)]
        for name, text in CHAT_PROMPTS.items():
            ids = chat(target, text)
            plain, spec, stats = [], {n: [] for n in drafts}, {}
            for _ in range(args.reps):
                *sp, tp, _ = levante_run(target, ids, args.n)
                plain.append(sp)
                for n, llm in drafted.items():
                    *sd, td, stats[n] = levante_run(llm, ids, args.n)
                    assert tp == td, f"{name}: the {n} draft model changed the greedy output"
                    spec[n].append(sd)
            cells = [f"{statistics.median(r[0] for r in spec[n]):.1f} | "
                     f"{ratio(plain, spec[n], 0):.2f}x ({ratio(plain, spec[n], 1):.2f}x) | "
                     f"{stats[n].get('acceptance', 0):.0%} | {stats[n].get('tokens_per_forward', 1):.2f}"
                     for n in drafts]
            lines.append(f"| {name} | {len(target.tokenize(tp, add_bos=False))} | "
                         f"{statistics.median(r[0] for r in plain):.1f} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
