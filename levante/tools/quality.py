"""Model quality measurements: perplexity (llama.cpp-compatible) and base-vs-other comparison (KL, top-1).

Chunking (the default, ``stride=None``) follows llama.cpp's ``tools/perplexity/perplexity.cpp``:

* the text is tokenized once; it is cut into ``len(ids) // n_ctx`` non-overlapping chunks of exactly
  ``n_ctx`` tokens (the remainder is dropped);
* when the model's tokenizer adds a BOS token, the first token of every chunk is *replaced* by BOS;
* only the second half of each chunk is scored: the logits at positions ``first = n_ctx // 2`` ..
  ``n_ctx - 2`` predict tokens ``first + 1`` .. ``n_ctx - 1`` (``n_ctx - first - 1`` tokens per chunk),
  so every scored token has at least ``n_ctx / 2`` tokens of context;
* ``PPL = exp(mean NLL)`` and the uncertainty is llama.cpp's ``PPL * sqrt((E[nll^2] - E[nll]^2) / (N - 1))``
  (the standard error of the mean NLL, carried to PPL to first order).

``stride=S`` gives the sliding-window variant of Hugging Face's perplexity guide instead: windows of
``n_ctx`` tokens start every ``S`` tokens (0, S, 2S, ...); each window scores only the tokens no earlier
window scored (the first window scores everything after its first token), so each token is scored once,
with between ``n_ctx - S`` and ``n_ctx - 1`` tokens of context. No BOS replacement is done in this mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PerplexityResult:
    ppl: float
    err: float  # llama.cpp's "+/-" value
    nll_per_token: Tensor  # float64 [n_scored], in text order
    chunks: list[float]  # perplexity of each chunk / window
    n_ctx: int = 0
    stride: int | None = None

    @property
    def n_scored(self) -> int:
        return int(self.nll_per_token.numel())

    def __str__(self) -> str:
        return f"PPL = {self.ppl:.4f} +/- {self.err:.5f}"


@dataclass
class _Window:
    tokens: list[int]  # what the model sees
    first: int  # logits at first .. len-2 predict tokens first+1 .. len-1
    targets: list[int] = field(default_factory=list)  # the original tokens first+1 .. len-1


def windows(ids: Sequence[int], n_ctx: int, stride: int | None = None, n_chunks: int | None = None,
            bos_id: int | None = None) -> list[_Window]:
    """The evaluation windows of `ids` (see the module docstring); `bos_id`: replace each chunk's first token."""
    ids = [int(t) for t in ids]
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be >= 4, got {n_ctx}")
    out: list[_Window] = []
    if stride is None:
        n_max = len(ids) // n_ctx
        n = n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)
        if n == 0:
            raise ValueError(f"the text has {len(ids)} tokens: need at least n_ctx={n_ctx} for one chunk")
        first = n_ctx // 2
        for i in range(n):
            chunk = ids[i * n_ctx : (i + 1) * n_ctx]
            toks = list(chunk)
            if bos_id is not None:
                toks[0] = bos_id
            out.append(_Window(toks, first, chunk[first + 1 :]))
        return out
    if not 0 < stride <= n_ctx:
        raise ValueError(f"stride must be in 1..n_ctx ({n_ctx}), got {stride}")
    if len(ids) < 2:
        raise ValueError("the text needs at least 2 tokens")
    prev_end = 1  # token 0 is never predicted
    for begin in range(0, len(ids), stride):
        end = min(begin + n_ctx, len(ids))
        if end <= prev_end:
            break
        toks = ids[begin:end]
        first = prev_end - 1 - begin  # logit index predicting token prev_end
        out.append(_Window(toks, first, toks[first + 1 :]))
        prev_end = end
        if n_chunks is not None and 0 <= n_chunks <= len(out):
            break
        if end == len(ids):
            break
    return out


def _bos_for(llm: Any) -> int | None:
    tok = getattr(llm, "tokenizer", None)
    if tok is not None and getattr(tok, "add_bos", False) and tok.bos_id is not None:
        return int(tok.bos_id)
    return None


def _logprobs(llm: Any, w: _Window) -> Tensor:
    """log-softmax over the vocabulary at the scored positions of window `w`: float32 [n_scored, vocab]."""
    logits = llm.logits(w.tokens)[w.first : len(w.tokens) - 1].float()
    return F.log_softmax(logits, dim=-1)


def _progress(it: list, progress: bool, desc: str) -> Iterator:
    if not progress:
        return iter(it)
    from tqdm import tqdm

    return iter(tqdm(it, desc=desc, unit="chunk"))


def _summary(nll: Tensor) -> tuple[float, float]:
    """(ppl, err) exactly as llama.cpp prints them."""
    n = nll.numel()
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll * nll).mean()) - mean * mean
    err = ppl * math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0
    return ppl, err


def perplexity(llm: Any, ids: Sequence[int], n_ctx: int = 512, stride: int | None = None,
               progress: bool = True, n_chunks: int | None = None,
               bos_id: int | None | str = "auto") -> PerplexityResult:
    """Perplexity of `llm` (anything with `.logits(ids)`, e.g. `levante.LLM`) on the token ids `ids`.

    `bos_id="auto"`: replace each chunk's first token by BOS when the model's tokenizer adds one
    (llama.cpp's rule); pass None to disable or an id to force.
    """
    bos = _bos_for(llm) if bos_id == "auto" else bos_id
    ws = windows(ids, n_ctx, stride, n_chunks, bos if stride is None else None)
    nlls, chunks = [], []
    for w in _progress(ws, progress, "perplexity"):
        lp = _logprobs(llm, w)
        nll = -lp.gather(1, torch.tensor(w.targets)[:, None])[:, 0].double()
        nlls.append(nll)
        chunks.append(math.exp(float(nll.mean())))
    allnll = torch.cat(nlls)
    ppl, err = _summary(allnll)
    return PerplexityResult(ppl, err, allnll, chunks, n_ctx, stride)


def compare(base_llm: Any, other_llm: Any, ids: Sequence[int], n_ctx: int = 512, stride: int | None = None,
            progress: bool = True, n_chunks: int | None = None) -> dict[str, Any]:
    """Run both models over the same windows; return perplexities, mean KL(base || other) per scored
    token, top-1 agreement, and per-chunk values (all in a JSON-friendly dict)."""
    bos = _bos_for(base_llm)
    ws = windows(ids, n_ctx, stride, n_chunks, bos if stride is None else None)
    nll_b, nll_o, kls, agree = [], [], [], []
    per_chunk = []
    for i, w in enumerate(_progress(ws, progress, "compare")):
        lb, lo = _logprobs(base_llm, w), _logprobs(other_llm, w)
        if lb.shape != lo.shape:
            raise ValueError(f"the models have different vocabularies ({lb.shape[-1]} vs {lo.shape[-1]} logits)")
        tgt = torch.tensor(w.targets)[:, None]
        nb = -lb.gather(1, tgt)[:, 0].double()
        no = -lo.gather(1, tgt)[:, 0].double()
        kl = (lb.double().exp() * (lb.double() - lo.double())).sum(-1).clamp(min=0)
        top = (lb.argmax(-1) == lo.argmax(-1)).double()
        nll_b.append(nb)
        nll_o.append(no)
        kls.append(kl)
        agree.append(top)
        per_chunk.append({"chunk": i, "ppl_base": math.exp(float(nb.mean())), "ppl_other": math.exp(float(no.mean())),
                          "kl": float(kl.mean()), "top1": float(top.mean())})
    nb, no, kl, top = torch.cat(nll_b), torch.cat(nll_o), torch.cat(kls), torch.cat(agree)
    ppl_b, err_b = _summary(nb)
    ppl_o, err_o = _summary(no)
    n = kl.numel()
    return {
        "n_ctx": n_ctx, "stride": stride, "n_chunks": len(ws), "n_scored": n,
        "ppl_base": ppl_b, "ppl_base_err": err_b, "ppl_other": ppl_o, "ppl_other_err": err_o,
        "ppl_ratio": ppl_o / ppl_b,
        "kl_mean": float(kl.mean()), "kl_err": float(kl.std() / math.sqrt(n)) if n > 1 else 0.0,
        "kl_p99": float(kl.quantile(0.99)) if n > 1 else float(kl.mean()), "kl_max": float(kl.max()),
        "top1_agreement": float(top.mean()),
        "chunks": per_chunk,
    }


def report_markdown(report: dict[str, Any], base_name: str = "base", other_name: str = "other",
                    plot: str | None = None, title: str = "Model comparison") -> str:
    """A markdown rendering of a `compare` report."""
    r = report
    mode = f"sliding window, stride {r['stride']}" if r.get("stride") else "llama.cpp chunks (second half scored)"
    lines = [
        f"# {title}", "",
        f"- base: `{base_name}`", f"- other: `{other_name}`",
        f"- {r['n_chunks']} chunks of n_ctx={r['n_ctx']} ({mode}), {r['n_scored']} scored tokens", "",
        "| metric | value |", "|---|---|",
        f"| PPL base | {r['ppl_base']:.4f} +/- {r['ppl_base_err']:.5f} |",
        f"| PPL other | {r['ppl_other']:.4f} +/- {r['ppl_other_err']:.5f} |",
        f"| PPL ratio other/base | {r['ppl_ratio']:.4f} |",
        f"| mean KL(base ‖ other) | {r['kl_mean']:.6f} +/- {r['kl_err']:.6f} |",
        f"| KL p99 / max | {r['kl_p99']:.6f} / {r['kl_max']:.6f} |",
        f"| top-1 agreement | {100 * r['top1_agreement']:.2f}% |", "",
        "| chunk | PPL base | PPL other | KL | top-1 |", "|---|---|---|---|---|",
    ]
    for c in r["chunks"]:
        lines.append(f"| {c['chunk']} | {c['ppl_base']:.4f} | {c['ppl_other']:.4f} | {c['kl']:.6f} | "
                     f"{100 * c['top1']:.2f}% |")
    if plot:
        lines += ["", f"![per-chunk KL and perplexity]({plot})"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str, base_name: str = "base", other_name: str = "other") -> None:
    """PNG with per-chunk KL (top) and perplexity of both models (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [c["chunk"] for c in report["chunks"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(xs, [c["kl"] for c in report["chunks"]], marker="o", color="tab:red")
    ax1.set_ylabel("mean KL(base ‖ other)")
    ax1.grid(alpha=0.3)
    ax2.plot(xs, [c["ppl_base"] for c in report["chunks"]], marker="o", label=base_name)
    ax2.plot(xs, [c["ppl_other"] for c in report["chunks"]], marker="s", label=other_name)
    ax2.set_ylabel("perplexity")
    ax2.set_xlabel("chunk")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"KL {report['kl_mean']:.4f}, top-1 {100 * report['top1_agreement']:.1f}%, "
                 f"PPL {report['ppl_base']:.3f} -> {report['ppl_other']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
