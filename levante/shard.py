"""How a model's weights split across the ranks of a tensor- or expert-parallel group (Megatron layout).

Tensor parallelism over N ranks: wq, wk, wv and the feed-forward w1 / w3 (of every expert) are split by output
rows (whole heads, whole intermediate rows), wo and w2 by input columns, so each rank computes a partial sum of
the attention and feed-forward outputs and one all-reduce per sub-layer completes it. Each rank holds the KV
cache of its own kv heads. Expert parallelism keeps attention tensor-parallel but gives each rank whole experts
(E / N of them, contiguous ids); the router runs everywhere and each rank adds its experts' share.

Embedding, norms, router and lm_head are replicated (gpt-fast's choice): the lookup reads only the rows of the
prompt, and for the Mixtral family the head is ~1 % of the bytes a token reads, not worth an all-gather per step.

Readers call `cut` on each weight before converting it, so a rank copies only its slice out of the memory-mapped
file. A quantized tensor splits on block boundaries; a split that does not fall on one is a `ShardError` naming
the tensor.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
from dataclasses import dataclass

from torch import Tensor

from .config import ModelConfig
from .errors import LevanteError

_ROWS = re.compile(r"(attn\.w[qkv]|ffn\.(experts\.\d+\.)?w[13])$")
_COLS = re.compile(r"(attn\.wo|ffn\.(experts\.\d+\.)?w2)$")
_EXPERT = re.compile(r"ffn\.experts\.(\d+)\.w[123]$")


class ShardError(LevanteError):
    """The model cannot be split this way (a dimension that does not divide, a block that would be cut)."""


@dataclass(frozen=True)
class Shard:
    """This process's part of a model split over `size` ranks."""

    rank: int
    size: int
    expert_parallel: bool = False
    num_experts: int = 0  # the model's (set by `for_config`): which rank owns which expert

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad shard: rank {self.rank} of {self.size}")

    # ------------------------------------------------------------------ the layout
    def check(self, cfg: ModelConfig) -> None:
        """ShardError naming the first dimension that does not divide by the group size."""
        n = self.size
        for what, value, tensor in (("attention heads", cfg.num_heads, "attn.wq / attn.wo"),
                                    ("kv heads", cfg.num_kv_heads, "attn.wk / attn.wv")):
            if value % n:
                raise ShardError(f"{what} ({value}) do not divide by the {n} ranks: cannot split {tensor}")
        if self.expert_parallel:
            if not cfg.is_moe:
                raise ShardError("expert parallelism needs a mixture-of-experts model (this one has no experts)")
            if cfg.num_experts % n:
                raise ShardError(f"{cfg.num_experts} experts do not divide by the {n} ranks")
        elif cfg.intermediate_size % n:
            raise ShardError(f"the feed-forward size {cfg.intermediate_size} does not divide by the {n} ranks: "
                             "cannot split ffn w1 / w2 / w3")

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The shapes this rank's model has (heads and, for tensor parallelism, feed-forward rows divided)."""
        n = self.size
        ffn = cfg.intermediate_size if self.expert_parallel else cfg.intermediate_size // n
        return dataclasses.replace(cfg, num_heads=cfg.num_heads // n, num_kv_heads=cfg.num_kv_heads // n,
                                   intermediate_size=ffn, head_dim=cfg.head_dim)

    def experts(self, cfg: ModelConfig) -> list[int] | None:
        """The expert ids this rank holds (None: all of them, the model is not expert-parallel)."""
        if not (self.expert_parallel and cfg.is_moe):
            return None
        per = cfg.num_experts // self.size
        return list(range(self.rank * per, (self.rank + 1) * per))

    def for_config(self, cfg: ModelConfig) -> Shard:
        """This shard checked against `cfg`, knowing its expert count."""
        self.check(cfg)
        return dataclasses.replace(self, num_experts=cfg.num_experts)

    def holds(self, canon: str) -> bool:
        """Whether this rank keeps weight `canon` at all: expert parallelism drops the other ranks' experts, and
        only rank 0 computes logits (a model built without lm_head ties it to the embedding, which costs nothing)."""
        if canon == "lm_head":
            return self.rank == 0 or self.size == 1
        m = _EXPERT.search(canon)
        if m is None or not self.expert_parallel:
            return True
        return int(m.group(1)) // (self.num_experts // self.size) == self.rank

    def split(self, canon: str) -> int | None:
        """The dimension weight `canon` is split along on this rank (0: rows, 1: columns), None if whole."""
        if self.size == 1:
            return None
        if self.expert_parallel and _EXPERT.search(canon):
            return None
        if _ROWS.search(canon):
            return 0
        if _COLS.search(canon):
            return 1
        return None

    def bounds(self, n: int) -> tuple[int, int]:
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    # ------------------------------------------------------------------ cutting
    def cut(self, canon: str, t: Tensor, block: int = 1, type_size: int | None = None, name: str = "",
            dim: int | None = None) -> Tensor:
        """This rank's slice of weight `canon` ([out, in], or [out, bytes per row] of GGML blocks of `block`
        values in `type_size` bytes): rows as a view (a contiguous range of the file), columns as a new tensor;
        the tensor itself when it is not split. `dim` overrides the layout's dimension (the factors of a low-rank
        weight)."""
        d = self.split(canon) if dim is None else dim
        if d is None:
            return t
        what = name or canon
        if d == 0:
            lo, hi = self.bounds(t.shape[0])
            return t[lo:hi]
        cols = t.shape[1] // (type_size or 1) * block if type_size else t.shape[1]
        lo, hi = self.bounds(cols)
        if lo % block or hi % block:
            raise ShardError(f"{what}: its {cols} columns over {self.size} ranks are {hi - lo} each, not whole "
                             f"{block}-value quantization blocks; use fewer ranks or another quant type")
        if type_size:
            lo, hi = lo // block * type_size, hi // block * type_size
        return t[:, lo:hi].clone()

    def cut_all(self, weights: dict[str, Tensor], sources: dict[str, str]) -> None:
        """In place: drop the weights this rank does not hold, cut the split float tensors."""
        for canon in list(weights):
            if not self.holds(canon):
                del weights[canon]
            else:
                weights[canon] = self.cut(canon, weights[canon], name=sources.get(canon, ""))

    def cut_awq(self, canon: str, parts: dict[str, Tensor], group: int, name: str = "",
                dim: int | None = None) -> dict[str, Tensor]:
        """The slice of an AutoAWQ GEMM triplet (qweight [in, out/8] int32, qzeros [in/g, out/8], scales
        [in/g, out]): output features in multiples of 8, input features in whole groups."""
        d = self.split(canon) if dim is None else dim
        if d is None:
            return parts
        qw, qz, sc = parts["qweight"], parts["qzeros"], parts["scales"]
        what = name or canon
        if d == 0:
            lo, hi = self.bounds(sc.shape[1])
            if lo % 8 or hi % 8:
                raise ShardError(f"{what}: {hi - lo} output features per rank is not a multiple of 8 (AWQ packing)")
            return {"qweight": qw[:, lo // 8 : hi // 8].clone(), "qzeros": qz[:, lo // 8 : hi // 8].clone(),
                    "scales": sc[:, lo:hi].clone()}
        lo, hi = self.bounds(qw.shape[0])
        if lo % group or hi % group:
            raise ShardError(f"{what}: {hi - lo} input features per rank is not a whole number of "
                             f"{group}-wide AWQ groups")
        return {"qweight": qw[lo:hi].clone(), "qzeros": qz[lo // group : hi // group].clone(),
                "scales": sc[lo // group : hi // group].clone()}


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc): cutting weights frees many tensor-sized temporaries,
    which malloc would otherwise keep, and count in the process's memory, after they are gone."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
