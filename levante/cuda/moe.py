"""Fused mixture of experts for the GPU: experts stacked per layer, routing and grouping on the device.

`FusedMoE` replaces a model's `MoE` module (same results): the router's softmax / top-k / renormalisation, the
sort of (token, choice) pairs by expert (`align_by_expert`) and two grouped GEMMs (levante.cuda.triton_moe: gate
and up projections together, then the down projection times the routing weights) run as device ops of fixed
shapes, with no host sync and no Python loop over experts, so a decode step can be captured in a CUDA graph; the
grid skips the experts no token chose, so batch-1 decode reads only its top-k experts. Experts are float weights
or packed quantized ones (levante.cuda.packed), all of one format per stack; low-rank experts run their two
factors as two grouped GEMMs each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.base import DenseWeight, QuantWeight
from ..quant.lowrank import LowRankWeight
from .packed import PackedWeight
from .triton_fused import router, silu_mul, topk_softmax
from .triton_matmul import GEMV, Launch, dot_launch, use_gemv
from .triton_moe import moe_matmul

_PLANES = ("lo", "hi", "d", "sc", "dm", "mc")


@dataclass
class Routing:
    """How a batch's (token, choice) pairs reach the grouped GEMMs, for the kernel `launch` names.

    Tiled (launch.bm > 1): sorted by expert, each expert's run padded to whole blocks of launch.bm: sorted_ids [P]:
    pair index token * top_k + choice, or `n_pairs` for padding; block_expert [P / bm]: the expert of each block;
    n_padded [1]: how many entries of sorted_ids are in use (the rest: empty blocks).
    GEMV (launch.bm == 1): the pairs in order, `experts` [n_pairs] the expert of each."""

    n_pairs: int
    launch: Launch
    sorted_ids: Tensor | None = None
    block_expert: Tensor | None = None
    n_padded: Tensor | None = None
    experts: Tensor | None = None


def align_by_expert(topk_ids: Tensor, n_experts: int, launch: Launch) -> Routing:
    """Sort the pairs of topk_ids [M, k] by expert, on the device, in shapes that depend on M, k, E and the block
    size launch.bm only. An id of -1 (an expert of another rank) sorts after all the others, past n_padded: no
    block runs it."""
    bm = launch.bm
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    flat = torch.where(flat < 0, n_experts, flat)
    blocks = (n + (n_experts + 1) * (bm - 1) + bm - 1) // bm
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm
    pad_end = padded.cumsum(0)
    order = flat.argsort(stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert_of]
    sorted_ids = torch.full((blocks * bm,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, (pad_end - padded)[expert_of] + rank, order.to(torch.int32))
    starts = torch.arange(blocks, device=dev) * bm
    block_expert = torch.searchsorted(pad_end, starts, right=True).clamp_(max=n_experts - 1).to(torch.int32)
    return Routing(n, launch, sorted_ids, block_expert, pad_end[n_experts - 1 : n_experts].to(torch.int32))


def route(topk_ids: Tensor, n_experts: int, packed: bool) -> Routing:
    """The routing of topk_ids [M, k] (-1: another rank's expert, not run) for the kernel that suits M: the GEMV
    for one token (its k pairs go to k different experts, so no sort is needed), else the tiled kernel's blocks
    (`packed`: of quantized experts)."""
    m = topk_ids.shape[0]
    if use_gemv(m, packed):
        return Routing(topk_ids.numel(), GEMV, experts=topk_ids.reshape(-1))
    return align_by_expert(topk_ids, n_experts, dot_launch(m, dense=not packed))


class ExpertStack(nn.Module):
    """The same projection of every expert, stacked: float [E, N, K] (`weight`), or the planes of packed weights
    of one format, each [E, ...] (`lo`, `hi`, `d`, `sc`, `dm`, `mc`)."""

    def __init__(self, weights: list[QuantWeight]) -> None:
        super().__init__()
        first = weights[0]
        self.out_features, self.in_features = first.out_features, first.in_features
        if any(w.shape != first.shape for w in weights):
            raise ValueError("experts of different shapes")
        if all(isinstance(w, DenseWeight) for w in weights):
            self.register_buffer("weight", torch.stack([w.weight for w in weights]), persistent=False)
            self.qtype, self.bits, self.off, self.g, self.sg = first.qtype, 16, 0, 1, 1
            for name in _PLANES:
                setattr(self, name, None)
            return
        if not all(isinstance(w, PackedWeight) and w.qtype == first.qtype for w in weights):
            raise TypeError(f"cannot stack experts of formats {sorted({w.qtype for w in weights})}")
        self.weight = None
        self.qtype, self.bits, self.off, self.g, self.sg = first.qtype, first.bits, first.off, first.g, first.sg
        for name in _PLANES:
            self.register_buffer(name, torch.stack([getattr(w, name) for w in weights]).contiguous(), persistent=False)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def n_params(self) -> int:
        """Parameters of the stack (of every expert; zero-padded low-rank factors counted as stored)."""
        n = (self.weight if self.weight is not None else self.d).shape[0]
        return n * self.out_features * self.in_features

    @staticmethod
    def stackable(weights: list[QuantWeight]) -> bool:
        if all(isinstance(w, DenseWeight) for w in weights):
            return len({(w.weight.dtype, w.shape) for w in weights}) == 1
        return all(isinstance(w, PackedWeight) for w in weights) and len({(w.qtype, w.shape) for w in weights}) == 1

    def concat(self, other: ExpertStack) -> ExpertStack:
        """One stack of [self; other] along the output features (gate and up projections, one GEMM)."""
        if (self.weight is None) != (other.weight is None) or self.qtype != other.qtype:
            raise TypeError(f"cannot concatenate {self.qtype} and {other.qtype} experts")
        out = ExpertStack.__new__(ExpertStack)
        nn.Module.__init__(out)
        out.out_features, out.in_features = self.out_features + other.out_features, self.in_features
        out.qtype, out.bits, out.off, out.g, out.sg = self.qtype, self.bits, self.off, self.g, self.sg
        names = ("weight",) if self.weight is not None else _PLANES
        for name in ("weight", *_PLANES):
            if name not in names:
                setattr(out, name, None)
                continue
            a, b = getattr(self, name), getattr(other, name)
            out.register_buffer(name, torch.cat([a, b], dim=1) if a.numel() else a, persistent=False)
        return out


class Projection(nn.Module):
    """One projection (w1, w2 or w3) of every expert: one stack, or, for low-rank experts (W = B A), a stack of
    the A factors then one of the B factors (never multiplied out). Float factors of different ranks are
    zero-padded to the largest rank of the layer (exact: the padding adds zeros); quantized factors stack when
    their shapes agree."""

    def __init__(self, weights: list[QuantWeight]) -> None:
        super().__init__()
        self.out_features = weights[0].out_features
        if all(isinstance(w, LowRankWeight) for w in weights):
            a, b = [w.a for w in weights], [w.b for w in weights]
            if all(isinstance(f, Tensor) for f in a + b):
                r = max(f.shape[0] for f in a)
                a = [DenseWeight(F.pad(f, (0, 0, 0, r - f.shape[0]))) for f in a]
                b = [DenseWeight(F.pad(f, (0, r - f.shape[1]))) for f in b]
            self.stacks = nn.ModuleList([ExpertStack(a), ExpertStack(b)])
        else:
            self.stacks = nn.ModuleList([ExpertStack(weights)])

    @staticmethod
    def fusable(weights: list[QuantWeight]) -> bool:
        if all(isinstance(w, LowRankWeight) for w in weights):
            a, b = [w.a for w in weights], [w.b for w in weights]
            if all(isinstance(f, Tensor) for f in a + b):
                return len({f.dtype for f in a + b}) == 1
            return ExpertStack.stackable(a) and ExpertStack.stackable(b)
        return ExpertStack.stackable(weights)

    @property
    def single(self) -> ExpertStack | None:
        return self.stacks[0] if len(self.stacks) == 1 else None

    def run(self, x: Tensor, routing: Routing, a_div: int, topk_weights: Tensor | None = None) -> Tensor:
        """[pairs, out_features]: row p = x[p // a_div] through this projection of pair p's expert (times its
        routing weight when given)."""
        for i, stack in enumerate(self.stacks):
            y = torch.empty(routing.n_pairs, stack.out_features, dtype=x.dtype, device=x.device)
            last = i == len(self.stacks) - 1
            moe_matmul(x, y, stack, routing, a_div if i == 0 else 1, topk_weights if last else None)
            x = y
        return x


class FusedMoE(nn.Module):
    """A `MoE` module's computation as device ops and grouped GEMMs (see the module docstring).

    `expert_ids`: the experts held here when they are spread over ranks (expert parallelism): the router sees all
    of them, pairs of the others are not run and add zero (the ranks' outputs are summed by an all-reduce)."""

    def __init__(self, gate: QuantWeight, w1: list[QuantWeight], w2: list[QuantWeight], w3: list[QuantWeight],
                 top_k: int, expert_ids: list[int] | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.top_k = top_k
        self.n_experts = len(w1)
        local_of = None  # global expert id -> index here, -1 for another rank's
        if expert_ids is not None and len(expert_ids) < gate.out_features:
            dev = next(iter(gate.buffers())).device
            local_of = torch.full((gate.out_features,), -1, dtype=torch.long, device=dev)
            local_of[torch.tensor(expert_ids, device=dev)] = torch.arange(len(w1), device=dev)
        self.register_buffer("local_of", local_of, persistent=False)
        self.ffn = w1[0].out_features
        first, up = Projection(w1), Projection(w3)
        a, b = first.single, up.single
        # gate and up in one GEMM when both are single stacks of one format
        self.w13 = a.concat(b) if a is not None and b is not None and a.qtype == b.qtype else None
        self.w1, self.w3 = (None, None) if self.w13 is not None else (first, up)
        self.w2 = Projection(w2)
        self.packed = any(m.weight is None for m in self.modules() if isinstance(m, ExpertStack))

    @classmethod
    def from_module(cls, moe: nn.Module) -> FusedMoE | None:
        """The fused form of a levante.model.MoE (all its experts, or an expert-parallel rank's), or None where it
        does not apply (experts of mixed kinds, such as some low-rank and some full)."""
        experts = list(moe.experts)
        if not experts:
            return None
        ws = {n: [getattr(e, n) for e in experts] for n in ("w1", "w2", "w3")}
        if not all(Projection.fusable(v) for v in ws.values()):
            return None
        return cls(moe.gate, ws["w1"], ws["w2"], ws["w3"], moe.top_k, getattr(moe, "expert_ids", None))

    def forward(self, x: Tensor) -> Tensor:
        return self.parts(x).sum(-2)

    def parts(self, x: Tensor) -> Tensor:
        """Each token's top-k expert outputs, times their routing weights, not yet summed: [..., top_k, D] (the
        GPU decoder adds them in its next add + norm kernel)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()
        M = x.shape[0]
        if isinstance(self.gate, DenseWeight) and self.gate.weight.dtype in (torch.float32, x.dtype):
            weights, chosen = router(x, self.gate.weight, self.top_k)  # the gate's matmul in the same kernel
        else:
            weights, chosen = topk_softmax(self.gate(x), self.top_k, x.dtype)
        if self.local_of is not None:
            chosen = self.local_of[chosen]
        routing = route(chosen, self.n_experts, packed=self.packed)
        if self.w13 is not None:
            h = torch.empty(M * self.top_k, 2 * self.ffn, dtype=x.dtype, device=x.device)
            moe_matmul(x, h, self.w13, routing, self.top_k)
            gate, up = h[:, : self.ffn], h[:, self.ffn :]
        else:
            gate, up = self.w1.run(x, routing, self.top_k), self.w3.run(x, routing, self.top_k)
        act = silu_mul(gate, up)
        out = self.w2.run(act, routing, 1, weights.reshape(-1))
        if self.local_of is not None:  # other ranks' pairs: rows never written
            out = out.masked_fill(chosen.reshape(-1, 1) < 0, 0)
        return out.view(*shape[:-1], self.top_k, shape[-1])


def fuse_moe(net: nn.Module) -> int:
    """Replace every MoE module of `net` that can be fused by a FusedMoE, in place; returns how many."""
    done = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            # a levante.model.MoE (the model sits a layer above: recognised by its parts, not imported)
            is_moe = hasattr(child, "experts") and hasattr(child, "top_k") and hasattr(child, "gate")
            if is_moe and (fused := FusedMoE.from_module(child)) is not None:
                setattr(parent, name, fused)
                done += 1
    return done
