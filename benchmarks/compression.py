"""Low-rank compression benchmark: parameters removed vs perplexity / KL / top-1 agreement.

Models:
* SmolLM2-135M-Instruct (the embedded Q4_1 GGUF, dequantized to float32 = the baseline; its 90 MLP
  matrices are compressed). n_ctx 512, `--chunks` chunks (default 2) from the second half of the
  token stream of data/kjv_genesis_exodus.txt; calibration on its first `--calib-tokens` tokens.
* A tiny Mixtral trained on Genesis (8 experts top-2, hidden 256, 4 layers; made by
  `benchmarks/train_tiny_mixtral.py` into benchmarks/cache/tiny-mixtral-kjv/, which this script
  creates if it is missing). It was trained on 256-token sequences, so it is evaluated at n_ctx 256,
  `--mixtral-chunks` chunks (default 32) of Exodus only (held out from training); calibration on the
  first `--calib-tokens` tokens of Genesis.

KL = mean KL(original || compressed) per scored token (llama.cpp chunking: the second half of each
chunk is scored); top-1 = argmax agreement with the original. Everything runs on one thread.

    python benchmarks/compression.py [--models smollm2,mixtral] [--out benchmarks/results/compression.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_tiny_mixtral import DEFAULT_OUT as MIXTRAL_DIR  # noqa: E402
from train_tiny_mixtral import split_text  # noqa: E402

from levante import LLM  # noqa: E402
from levante.tools.compress import compress_model, dir_size  # noqa: E402
from levante.tools.quality import compare  # noqa: E402

THREADS = 1
MIXTRAL_NAME = "tiny Mixtral, 8 experts (trained on Genesis)"


class Cached:
    """An LLM whose logits are memoised (the baseline is evaluated once for all variants)."""

    def __init__(self, llm):
        self.llm, self.tokenizer, self._cache = llm, llm.tokenizer, {}

    def logits(self, ids):
        key = tuple(ids)
        if key not in self._cache:
            self._cache[key] = self.llm.logits(ids)
        return self._cache[key]


@dataclass
class Model:
    """One benchmarked model: its source, cached baseline, evaluation / calibration tokens."""

    key: str
    name: str
    src: Path
    base: Cached
    n_ctx: int
    n_chunks: int
    eval_ids: list[int]
    calib_ids: list[int]
    awq_group: int
    eval_desc: str

    def other(self, path: Path) -> LLM:
        """A compressed / quantized copy as an LLM with the baseline's tokenizer."""
        from levante.loader import load

        loaded = load(path)
        loaded.tokenizer = self.base.tokenizer  # AWQ dirs made from a GGUF carry no tokenizer files
        return LLM(n_ctx=self.n_ctx, n_threads=THREADS, _loaded=loaded)

    def compare(self, path: Path) -> dict:
        return compare(self.base, self.other(path), self.eval_ids, self.n_ctx, n_chunks=self.n_chunks,
                       progress=False)


def ensure_mixtral() -> Path:
    if not (MIXTRAL_DIR / "model.safetensors").is_file():
        print(f"{MIXTRAL_DIR} missing: training it (benchmarks/train_tiny_mixtral.py)", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_tiny_mixtral.py")], check=True, env=env)
    return MIXTRAL_DIR


def setup(which: list[str], chunks: int, mixtral_chunks: int, calib_tokens: int) -> list[Model]:
    torch.set_num_threads(THREADS)
    out = []
    text = (ROOT / "data" / "kjv_genesis_exodus.txt").read_text()
    for key in which:
        if key == "smollm2":
            from fixtures import smollm2_gguf

            src = smollm2_gguf()
            llm = LLM(str(src), n_ctx=512, n_threads=THREADS, dtype="float32")
            ids = llm.tokenize(text)
            out.append(Model(key, "SmolLM2-135M (Q4_1 -> f32)", src, Cached(llm), 512, chunks, ids[len(ids) // 2 :],
                             ids[:calib_tokens], 64,
                             f"n_ctx 512, {chunks} chunks of the second half of the text"))
        elif key == "mixtral":
            src = ensure_mixtral()
            llm = LLM(str(src), n_ctx=256, n_threads=THREADS, dtype="float32")
            genesis, exodus = split_text()
            out.append(Model(key, MIXTRAL_NAME, src, Cached(llm), 256, mixtral_chunks, llm.tokenize(exodus),
                             llm.tokenize(genesis)[:calib_tokens], 128,
                             f"n_ctx 256, {mixtral_chunks} chunks of Exodus (held out)"))
        else:
            raise SystemExit(f"unknown model {key!r} (smollm2, mixtral)")
    return out


def run(m: Model, tmp: str, rows: list[dict]) -> None:
    for ratio in (0.2, 0.4):
        for aware in (False, True):
            out = Path(tmp) / f"{m.key}-{ratio}-{int(aware)}"
            t0 = time.perf_counter()
            res, _ = compress_model(m.src, out, ratio=ratio, calib_ids=m.calib_ids if aware else None,
                                    calib_ctx=m.n_ctx)
            t_c = time.perf_counter() - t0
            rep = m.compare(out)
            rows.append({
                "model": m.name, "method": "low-rank " + ("activation-aware" if aware else "plain SVD"),
                "ratio": ratio, "removed": res.params_removed, "compressible": res.params_compressible,
                "total": res.params_total_before, "size": dir_size(out / "model.safetensors"),
                "ppl_base": rep["ppl_base"], "ppl": rep["ppl_other"], "ppl_err": rep["ppl_other_err"],
                "kl": rep["kl_mean"], "top1": rep["top1_agreement"], "secs": t_c,
            })
            print(rows[-1], flush=True)


def parse_and_setup() -> tuple[argparse.Namespace, list[Model]]:
    """The command line shared by compression.py and quant_table.py, and the models it names."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,mixtral")
    ap.add_argument("--chunks", type=int, default=2, help="SmolLM2 evaluation chunks (n_ctx 512)")
    ap.add_argument("--mixtral-chunks", type=int, default=32, help="trained Mixtral evaluation chunks (n_ctx 256)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compression.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    return args, setup(args.models.split(","), args.chunks, args.mixtral_chunks, args.calib_tokens)


def main() -> None:
    args, models = parse_and_setup()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            run(m, tmp, rows)
    evals = "; ".join(f"{m.name}: {m.eval_desc}" for m in models)
    lines = [
        "# Low-rank compression: parameters removed vs quality", "",
        f"Generated by `benchmarks/compression.py` (one thread; text `data/kjv_genesis_exodus.txt`; {evals}; "
        "llama.cpp chunking: second half of each chunk scored; activation-aware calibration on the first "
        f"{args.calib_tokens} tokens of the text, i.e. of Genesis). The tiny Mixtral (hidden 256, 4 layers, "
        "8 experts top-2, 29.6M parameters, vocab 32000) was trained for a few minutes on Genesis by "
        "`benchmarks/train_tiny_mixtral.py`, so its perplexity on the held-out Exodus means something. "
        "KL = mean KL(original ‖ compressed) per scored token; top-1 = argmax agreement with the original.", "",
        "| model | method | target | params removed (of compressible / of all) | safetensors MiB | "
        "PPL original | PPL compressed | KL | top-1 | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {int(100 * r['ratio'])}% | {r['removed']:,} "
            f"({100 * r['removed'] / r['compressible']:.1f}% / {100 * r['removed'] / r['total']:.1f}%) | "
            f"{r['size'] / 2**20:.1f} | {r['ppl_base']:.4f} | {r['ppl']:.4f} +/- {r['ppl_err']:.4f} | "
            f"{r['kl']:.4f} | {100 * r['top1']:.1f}% | {r['secs']:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
