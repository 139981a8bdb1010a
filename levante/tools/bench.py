"""`levante bench`: prefill and decode throughput, like llama-bench."""

from __future__ import annotations

import resource
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch

from ..quant.base import QuantWeight


@dataclass
class BenchResult:
    model: str
    size_bytes: int
    quant: str
    params: int
    threads: int
    device: str
    n_prompt: int
    n_gen: int
    prefill_tps: list[float]
    decode_tps: list[float]
    peak_rss_bytes: int

    @staticmethod
    def _fmt(xs: list[float]) -> str:
        if not xs:
            return "-"
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.2f} ± {sd:.2f}"

    def row(self) -> list[str]:
        return [
            self.model, f"{self.size_bytes / 2**20:.1f} MiB", self.quant, f"{self.params / 1e6:.1f} M",
            self.device, str(self.threads), f"pp{self.n_prompt}: {self._fmt(self.prefill_tps)}",
            f"tg{self.n_gen}: {self._fmt(self.decode_tps)}", f"{self.peak_rss_bytes / 2**20:.0f} MiB",
        ]


HEADER = ["model", "size", "quant", "params", "device", "threads", "prefill tok/s", "decode tok/s", "peak RSS"]


def weight_summary(model: torch.nn.Module) -> tuple[int, str, int]:
    """(bytes of weights, dominant quant type, parameter count) of a built model."""
    seen: set[int] = set()
    nbytes, params = 0, 0
    types: Counter[str] = Counter()
    # a QuantWeight inside another (low-rank factors, AWQ's Q5_0 blocks) is counted by its owner
    inner = {id(c) for m in model.modules() if isinstance(m, QuantWeight) for c in m.modules() if c is not m}
    for m in model.modules():
        # QuantWeights, and the GPU's stacked experts (levante.cuda.moe.ExpertStack: not imported, it needs triton)
        stack = type(m).__name__ == "ExpertStack"
        if (isinstance(m, QuantWeight) or stack) and id(m) not in seen and id(m) not in inner:
            seen.add(id(m))
            nbytes += m.nbytes
            n = m.n_params
            params += n
            types[m.qtype] += n
    return nbytes, (types.most_common(1)[0][0] if types else "?"), params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(llm, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, warmup: bool = True) -> BenchResult:
    """Time prefill of `n_prompt` tokens and greedy decode of `n_gen` tokens, `reps` times each."""
    model = getattr(llm, "generation_model", llm.model)  # on a GPU: the graph-captured decoder
    device = model.model.device
    gen = torch.Generator().manual_seed(0)
    vocab = llm.config.vocab_size
    low = min(100, vocab // 2)
    prompt = torch.randint(low, vocab, (1, n_prompt), generator=gen).to(device)
    prefill, decode = [], []
    total = n_prompt + n_gen
    kv = getattr(llm, "kv_dtype", None)
    with torch.inference_mode(), llm.using_threads():
        threads = torch.get_num_threads()
        if warmup:
            cache = model.new_cache(1, total, kv)
            model(prompt[:, : min(32, n_prompt)], cache=cache, last_only=True)
            model(prompt[:, :1], cache=cache, last_only=True)
        for _ in range(reps):
            cache = model.new_cache(1, total, kv)
            _sync(device)
            t0 = time.perf_counter()
            for s in range(0, n_prompt, llm.n_batch):
                logits = model(prompt[:, s : s + llm.n_batch], cache=cache, last_only=True)
            _sync(device)
            prefill.append(n_prompt / (time.perf_counter() - t0))
            tok = logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n_gen):
                tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            decode.append(n_gen / (time.perf_counter() - t0))
    nbytes, quant, params = weight_summary(getattr(model, "local", model))  # a parallel model: rank 0's shard
    size = llm.loaded.path.stat().st_size if llm.loaded.path.is_file() else nbytes
    ranks = getattr(model, "tensor_parallel_size", 1)
    return BenchResult(
        model=llm.model_name, size_bytes=size, quant=quant, params=params, threads=threads,
        device=str(device) + (f" x{ranks} ranks" if ranks > 1 else ""), n_prompt=n_prompt, n_gen=n_gen,
        prefill_tps=prefill, decode_tps=decode,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def markdown_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
