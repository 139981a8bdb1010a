"""Fused mixture of experts for the GPU: experts stacked per layer, routing and grouping on the device.

`FusedMoE` replaces a model's `MoE` module (same results): the router's softmax / top-k / renormalisation, the
sort of (token, choice) pairs by expert (`align_by_expert`) and two grouped GEMMs (levante.cuda.triton_moe: gate
and up projections together, then the down projection times the routing weights) run as device ops of fixed
shapes, with no host sync and no Python loop over experts, so a decode step can be captured in a CUDA graph; the
grid skips the experts no token chose, so batch-1 decode reads only its top-k experts. Experts are float weights
or packed quantized ones (levante.cuda.packed), all of one format per stack; low-rank experts run their two
factors as two grouped GEMMs each. A projection whose experts are of several kinds (`levante compress` keeps some
matrices full) runs one part per kind, each writing the rows of its own experts' pairs.
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
from .triton_matmul import GEMV, Launch, dot_launch, gemv_launch, packed_matmul, use_gemv
from .triton_moe import moe_matmul

_PLANES = ("lo", "hi", "d", "sc", "dm", "mc")


@dataclass
class Routing:
    """How a batch's (token, choice) pairs reach the grouped GEMMs, for the kernel `launch` names.

    Sorted (the tiled kernel, or the GEMV of launch.bm > 1 rows): by expert, each expert's run padded to whole
    blocks of launch.bm: sorted_ids [P]: pair index token * top_k + choice, or `n_pairs` for padding; block_expert
    [P / bm]: the expert of each block; n_padded [1]: how many entries of sorted_ids are in use (the rest: empty
    blocks). In order (the GEMV of one row): the pairs as they are, `experts` [n_pairs] the expert of each."""

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


def route(topk_ids: Tensor, n_experts: int, packed: bool, wide: bool = False) -> Routing:
    """The routing of topk_ids [M, k] (-1: another rank's expert, not run) for the kernel that suits the pairs per
    expert (spread evenly): the GEMV while they are few, a program per pair (one on average: no sort needed) or per
    block of them sorted by expert, else the tiled kernel's blocks (`packed`: of quantized experts; `wide`: float32
    activations)."""
    m, k = topk_ids.shape
    per_expert = -(-m * k // n_experts)
    if use_gemv(per_expert, packed):
        if per_expert == 1:
            return Routing(topk_ids.numel(), GEMV, experts=topk_ids.reshape(-1))
        return align_by_expert(topk_ids, n_experts, gemv_launch(per_expert))
    return align_by_expert(topk_ids, n_experts, dot_launch(m, dense=not packed, wide=wide))


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


def _kind(w: QuantWeight) -> tuple | None:
    """What one projection's experts must share to be stacked together (None: no fused form): float weights of
    one dtype and shape, packed weights of one format and shape, low-rank factors (float ones of any rank: they
    are padded to the largest; quantized ones of one kind each)."""
    if isinstance(w, DenseWeight):
        return ("float", w.weight.dtype, w.shape)
    if isinstance(w, PackedWeight):
        return ("packed", w.qtype, w.shape)
    if isinstance(w, LowRankWeight):
        a, b = w.a, w.b
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            return ("low-rank", a.dtype, w.shape) if a.dtype == b.dtype else None
        ka, kb = (_kind(f) if isinstance(f, DenseWeight | PackedWeight) else None for f in (a, b))
        return ("low-rank", ka, kb) if ka is not None and kb is not None else None
    return None


def _float_dtypes(kinds: list[tuple]) -> set[torch.dtype]:
    out: set[torch.dtype] = set()
    for k in kinds:
        if k[0] == "low-rank":
            out |= {k[1]} if isinstance(k[1], torch.dtype) else _float_dtypes([k[1], k[2]])
        elif k[0] == "float":
            out.add(k[1])
    return out


class Part(nn.Module):
    """The experts of one projection that share a kind (`_kind`): one stack, or, for low-rank experts (W = B A),
    a stack of the A factors then one of the B factors (never multiplied out). Float factors of different ranks
    are zero-padded to the part's largest rank (exact: the padding adds zeros).

    `members`: the global ids of its experts, in stack order; `local_of` [n_global]: global id -> index in the
    stack, -1 for an expert not here (None when the part holds every expert in order)."""

    def __init__(self, weights: list[QuantWeight], members: list[int], n_global: int) -> None:
        super().__init__()
        self.out_features = weights[0].out_features
        if isinstance(weights[0], LowRankWeight):
            a, b = [w.a for w in weights], [w.b for w in weights]
            if isinstance(a[0], Tensor):
                r = max(f.shape[0] for f in a)
                a = [DenseWeight(F.pad(f, (0, 0, 0, r - f.shape[0]))) for f in a]
                b = [DenseWeight(F.pad(f, (0, r - f.shape[1]))) for f in b]
            self.stacks = nn.ModuleList([ExpertStack(a), ExpertStack(b)])
        else:
            self.stacks = nn.ModuleList([ExpertStack(weights)])
        self.members = tuple(members)
        self.packed = any(st.weight is None for st in self.stacks)
        local_of = None
        if self.members != tuple(range(n_global)):
            dev = next(iter(self.stacks[0].buffers())).device
            local_of = torch.full((n_global,), -1, dtype=torch.long, device=dev)
            local_of[torch.tensor(members, device=dev)] = torch.arange(len(members), device=dev)
        self.register_buffer("local_of", local_of, persistent=False)

    def concat(self, other: Part) -> Part | None:
        """This part and `other` (the same experts' up projections) as one GEMM, when both are one stack of one
        format; else None."""
        if len(self.stacks) != 1 or len(other.stacks) != 1 or self.members != other.members:
            return None
        a, b = self.stacks[0], other.stacks[0]
        if a.qtype != b.qtype or (a.weight is None) != (b.weight is None):
            return None
        out = Part.__new__(Part)
        nn.Module.__init__(out)
        out.out_features = self.out_features + other.out_features
        out.stacks = nn.ModuleList([a.concat(b)])
        out.members, out.packed = self.members, self.packed
        out.register_buffer("local_of", self.local_of, persistent=False)
        return out

    @property
    def quantized(self) -> bool:
        """Whether every stack is packed (a GEMV reads x: it may come as float32, `FusedMoE.parts`)."""
        return all(st.weight is None for st in self.stacks)

    def run(self, x: Tensor, y: Tensor, routing: Routing, a_div: int, topk_weights: Tensor | None) -> None:
        """y[p] = x[p // a_div] through this projection of pair p's expert (times its routing weight when given),
        for the pairs of this part's experts, in y's dtype; the other rows of y are not written."""
        for i, stack in enumerate(self.stacks):
            last = i == len(self.stacks) - 1
            out = y if last else torch.empty(routing.n_pairs, stack.out_features, dtype=y.dtype, device=x.device)
            moe_matmul(x, out, stack, routing, a_div if i == 0 else 1, topk_weights if last else None)
            x = out


class Projection(nn.Module):
    """One projection (w1, w2 or w3) of every expert, as parts of one kind each (usually one part; a layer of
    `levante compress` keeps some experts full and factors others: two parts). Each pair's row is written by the
    part of its expert."""

    def __init__(self, parts: list[Part]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = parts[0].out_features

    @classmethod
    def build(cls, weights: list[QuantWeight], expert_ids: list[int], n_global: int) -> Projection | None:
        """The experts' `weights` (global ids `expert_ids`) grouped by kind, or None where some have no fused form
        or their float dtypes differ (each would round at its own precision)."""
        kinds = [_kind(w) for w in weights]
        if None in kinds or len(_float_dtypes(kinds)) > 1:
            return None
        groups: dict[tuple, list[int]] = {}
        for i, k in enumerate(kinds):
            groups.setdefault(k, []).append(i)
        return cls([Part([weights[i] for i in idx], [expert_ids[i] for i in idx], n_global)
                    for idx in groups.values()])

    def concat(self, other: Projection) -> Projection | None:
        """[self; other] along the output features, part by part, when every part allows it (`Part.concat`)."""
        if len(self.parts) != len(other.parts):
            return None
        parts = [a.concat(b) for a, b in zip(self.parts, other.parts, strict=True)]
        return None if None in parts else Projection(parts)

    @property
    def quantized(self) -> bool:
        return all(p.quantized for p in self.parts)

    def run(self, x: Tensor, routing_of, a_div: int, topk_weights: Tensor | None = None,
            dtype: torch.dtype | None = None) -> Tensor:
        """[pairs, out_features] in `dtype` (default x's): row p = x[p // a_div] through this projection of pair
        p's expert (times its routing weight when given); `routing_of(part)`: the pairs' routing for that part's
        experts."""
        y = None
        for part in self.parts:
            routing = routing_of(part)
            if y is None:
                y = torch.empty(routing.n_pairs, self.out_features, dtype=dtype or x.dtype, device=x.device)
            part.run(x, y, routing, a_div, topk_weights)
        return y


class FusedMoE(nn.Module):
    """A `MoE` module's computation as device ops and grouped GEMMs (see the module docstring).

    `expert_ids`: the experts held here when they are spread over ranks (expert parallelism): the router sees all
    of them, pairs of the others are not run and add zero (the ranks' outputs are summed by an all-reduce)."""

    def __init__(self, gate: QuantWeight, w1: Projection, w2: Projection, w3: Projection, top_k: int,
                 expert_ids: list[int] | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.top_k = top_k
        self.n_experts = gate.out_features if expert_ids is None else len(expert_ids)
        held = None  # global expert id -> True where held here (expert parallelism)
        if self.n_experts < gate.out_features:
            held = torch.zeros(gate.out_features, dtype=torch.bool, device=next(iter(gate.buffers())).device)
            held[torch.tensor(expert_ids, device=held.device)] = True
        self.register_buffer("held", held, persistent=False)
        self.ffn = w1.out_features
        self.w13 = w1.concat(w3)  # gate and up in one GEMM where their parts allow it
        self.w1, self.w3 = (None, None) if self.w13 is not None else (w1, w3)
        self.w2 = w2

    @classmethod
    def from_module(cls, moe: nn.Module) -> FusedMoE | None:
        """The fused form of a levante.model.MoE (all its experts, or an expert-parallel rank's), or None where it
        does not apply (an expert weight with no fused form, or float experts of different dtypes)."""
        experts = list(moe.experts)
        if not experts:
            return None
        n_global = moe.gate.out_features
        ids = getattr(moe, "expert_ids", None)
        ids = list(range(len(experts))) if ids is None else list(ids)
        proj = {n: Projection.build([getattr(e, n) for e in experts], ids, n_global) for n in ("w1", "w2", "w3")}
        if None in proj.values():
            return None
        return cls(moe.gate, proj["w1"], proj["w2"], proj["w3"], moe.top_k, None if len(ids) == n_global else ids)

    def forward(self, x: Tensor) -> Tensor:
        return self.parts(x).sum(-2)

    def _router_reads(self, dtype: torch.dtype) -> bool:
        """Whether the router kernel computes the gate's matmul (a float gate in float32 or the activations'
        `dtype`)."""
        gate = self.gate
        return isinstance(gate, DenseWeight) and gate.weight.dtype in (torch.float32, dtype)

    def reads_float32(self, dtype: torch.dtype) -> bool:
        """Whether x, and the activation between the experts' GEMMs, may come as float32 holding values of the
        activations' `dtype` (`parts`): the gate is packed or read by the router kernel, and every expert is
        packed (a decode step's GEMVs read float32 x with fewer instructions)."""
        routed = isinstance(self.gate, PackedWeight) or self._router_reads(dtype)
        ups = [self.w13] if self.w13 is not None else [self.w1, self.w3]
        return routed and all(p.quantized for p in ups) and self.w2.quantized

    def parts(self, x: Tensor, dtype: torch.dtype | None = None, store: torch.dtype | None = None) -> Tensor:
        """Each token's top-k expert outputs, times their routing weights, not yet summed: [..., top_k, D] (the
        GPU decoder adds them in its next add + norm kernel), in the activations' `dtype` (default x's; x may be
        float32 holding such values where `reads_float32`); `store`: the dtype the activation between the
        experts' two GEMMs is stored in (float32 for the down projection's GEMV), default `dtype`."""
        shape = x.shape
        dtype = dtype or x.dtype
        x = x.reshape(-1, shape[-1]).contiguous()
        gate = self.gate
        if self._router_reads(dtype):
            weights, chosen = router(x, gate.weight, self.top_k, dtype)  # the gate's matmul in the same kernel
        elif isinstance(gate, PackedWeight):
            weights, chosen = topk_softmax(packed_matmul(x, gate, out_dtype=dtype), self.top_k, dtype)
        else:
            weights, chosen = topk_softmax(gate(x.to(dtype)), self.top_k, dtype)
        routings: dict[tuple, Routing] = {}

        def routing_of(part: Part) -> Routing:
            key = (part.members, part.packed)
            if key not in routings:
                ids = chosen if part.local_of is None else part.local_of[chosen]
                routings[key] = route(ids, len(part.members), part.packed, dtype == torch.float32)
            return routings[key]

        if self.w13 is not None:
            h = self.w13.run(x, routing_of, self.top_k, dtype=dtype)
            gate, up = h[:, : self.ffn], h[:, self.ffn :]
        else:
            gate, up = (p.run(x, routing_of, self.top_k, dtype=dtype) for p in (self.w1, self.w3))
        act = silu_mul(gate, up, store)
        out = self.w2.run(act, routing_of, 1, weights.reshape(-1), dtype=dtype)
        if self.held is not None:  # other ranks' pairs: rows never written
            out = out.masked_fill(~self.held[chosen].reshape(-1, 1), 0)
        return out.view(*shape[:-1], self.top_k, shape[-1])


def fuse_moe(net: nn.Module) -> int:
    """Replace every MoE module of `net` that can be fused by a FusedMoE, in place; returns how many."""
    done = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            # a levante.model.MoE (the model sits a layer above: recognised by its parts, not imported)
            is_moe = hasattr(child, "experts") and hasattr(child, "top_k") and hasattr(child, "gate")
            if is_moe and (fused := FusedMoE.from_module(child)) is not None:
                fused._forward_hooks.update(child._forward_hooks)  # a parallel rank's all-reduce stays
                setattr(parent, name, fused)
                done += 1
    return done
