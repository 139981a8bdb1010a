"""Mixtral / Mistral / Llama in plain PyTorch.

One decoder for all three: RMSNorm, rotary embeddings (rotate-half layout, as in Hugging Face
checkpoints), grouped-query attention with an optional sliding window, and either a dense SwiGLU
MLP or a sparse mixture of SwiGLU experts. Linear layers are `QuantWeight`s, so the model does not
know (or care) how its weights are stored.

Weights are addressed by canonical names (see `expected_shapes`); loaders translate their file's
names into these and `build_model` assembles the modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HEADS, ModelConfig, expected_shapes  # noqa: F401  (HEADS: re-exported)
from .errors import ContextLengthError, WeightsError
from .kv import RowCache
from .quant.base import DenseWeight, QuantWeight, as_weight
from .quant.kernels import GEMV_MAX_ROWS, decode_ext, ffn_raw, fused_matmul, ggml_raw
from .rope import apply_rotary, inv_freq
from .transfer import to_device

_SMALL = GEMV_MAX_ROWS  # token rows up to which the fused C++ decode ops are used (above: tile dequant + MKL)
_EMPTY = torch.empty(0)


class RMSNorm(nn.Module):
    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, cast back, then scale (transformers' order); one fused op when possible.
        if x.dtype == torch.float32 and x.device.type == "cpu" and (ext := decode_ext()) is not None:
            return ext.rmsnorm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.eps).view(x.shape)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        h = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half convention), with optional llama3 / linear scaling."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sign-folded sin, shape [B, 1, T, head_dim], for integer positions [B, T].

        The sin half that multiplies -x2 in rotate_half is stored negated, so that
        `apply_rotary` is x * cos + roll(x, d/2) * sin: rotate_half(x) == roll(x) * [-1.., +1..].
        """
        freqs = positions.clamp(min=0).float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return emb.cos().to(dtype)[:, None], sin.to(dtype)[:, None]


class KVCache(RowCache):
    """Preallocated key/value cache for a batch of sequences ("rows").

    Each row has its own length (steps written). A forward call works on a contiguous range of
    rows: rows that start at the same length share write slots (batched prefill of left-padded
    prompts, or one new request); rows of different lengths can advance by one token together
    (continuous batching). Each slot remembers the absolute position of the token it holds
    (-1 = empty or padding); the attention mask is built from those positions, so a sliding-window
    model can use a rolling buffer of `window` slots: slot = step % window.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        slack: int = 0,
    ) -> None:
        """`slack`: extra slots of a rolling buffer beyond the window, so that the last `slack` steps can be taken
        back after it wrapped (speculative decoding writes proposed tokens it may reject)."""
        self.window = cfg.sliding_window
        self.max_tokens = max_tokens
        self.capacity = min(max_tokens, self.window + slack) if self.window else max_tokens
        self.rolling = self.window is not None and self.capacity < max_tokens
        shape = (batch_size, cfg.num_kv_heads, self.capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.pos = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=device)
        self.lengths = [0] * batch_size  # steps written per row (padding included)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def step(self) -> int:
        """Length of row 0 (all rows, in plain batched generation)."""
        return self.lengths[0]

    def reset(self, row: int | None = None) -> None:
        rows = range(self.batch_size) if row is None else [row]
        for r in rows:
            self.pos[r] = -1
            self.lengths[r] = 0

    def truncate(self, row: int, n_steps: int) -> None:
        """Forget everything after the first `n_steps` steps of `row` (prefix reuse, rejected speculation). A
        rolling buffer that wrapped can give back at most its slack + 1 steps: older ones overwrote keys the
        window still needs."""
        n = self.lengths[row]
        if n_steps >= n:
            return
        self.check_take_back(row, n_steps)
        if self.rolling and n > self.capacity:
            for step in range(n_steps, n):
                self.pos[row, step % self.capacity] = -1
        else:
            self.pos[row, n_steps:] = -1
        self.lengths[row] = n_steps

    def copy_row(self, src: int, dst: int) -> None:
        """Make row `dst` a copy of row `src` (used to keep active rows contiguous)."""
        if src == dst:
            return
        n = min(self.lengths[src], self.capacity)
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        self.pos[dst] = self.pos[src]
        self.lengths[dst] = self.lengths[src]

    def swap_rows(self, a: int, b: int) -> None:
        super().swap_rows(a, b)
        self.pos[[a, b]] = self.pos[[b, a]]

    def select_rows(self, keep: Tensor) -> None:
        """Keep only rows `keep` (in that order)."""
        self.k = [t.index_select(0, keep) for t in self.k]
        self.v = [t.index_select(0, keep) for t in self.v]
        self.pos = self.pos.index_select(0, keep)
        self.lengths = [self.lengths[i] for i in keep.tolist()]


class _Plan:
    """How one forward chunk uses the cache (computed once, shared by every layer).

    Modes: "none" (no cache), "shared" (all rows at the same length: slots shared, any T),
    "concat" (shared, rolling buffer, multi-token chunk that wraps), "scatter" (rows of different
    lengths, one token each).
    """

    def __init__(self, cache: KVCache | None, positions: Tensor, window: int | None, rows: slice,
                 dtype: torch.dtype = torch.float32) -> None:
        self.cache = cache
        self.rows = rows
        B, T = positions.shape
        if cache is None:
            self.mode = "none"
            kpos = positions
        else:
            lens = cache.lengths[rows]
            if len(lens) != B:
                raise ValueError(f"batch of {B} rows but cache rows {rows} hold {len(lens)}")
            cap = cache.capacity
            if not cache.rolling and max(lens) + T > cap:
                raise ContextLengthError(
                    f"context overflow: {max(lens)} cached + {T} new tokens > n_ctx {cap}"
                )
            pos_view = cache.pos[rows]
            if min(lens) == max(lens):
                step = lens[0]
                steps = torch.arange(step, step + T, device=positions.device)
                new_pos = pos_view.clone()
                if T == 1 or step + T <= cap:
                    # Safe to write first: nothing this chunk still needs is overwritten.
                    self.mode = "shared"
                    self.src = slice(0, T)
                    self.slots = steps % cap
                    self.n_keys = min(step + T, cap)
                    new_pos[:, self.slots] = positions
                    kpos = new_pos[:, : self.n_keys]
                else:
                    # Rolling buffer and a chunk that wraps: attend over old cache + new keys, then
                    # keep only the newest `capacity` tokens.
                    self.mode = "concat"
                    self.n_old = min(step, cap)
                    keep = min(T, cap)
                    self.src = slice(T - keep, T)
                    self.slots = steps[T - keep :] % cap
                    kpos = torch.cat([pos_view[:, : self.n_old], positions], dim=1)
                    new_pos[:, self.slots] = positions[:, T - keep :]
            else:
                if T != 1:
                    raise ValueError("rows of different lengths can only advance one token at a time")
                self.mode = "scatter"
                self.batch_idx = torch.arange(B, device=positions.device)
                self.slots = torch.tensor([n % cap for n in lens], device=positions.device)
                self.n_keys = min(max(lens) + 1, cap)
                new_pos = pos_view.clone()
                new_pos[self.batch_idx, self.slots] = positions[:, 0]
                kpos = new_pos[:, : self.n_keys]
            self.new_pos = new_pos
        self.fast = None
        one_per_row = T == 1 and B <= _SMALL and self.mode in ("shared", "scatter")
        few_in_one_row = B == 1 and 1 < T <= _SMALL and self.mode == "shared"  # speculative verification
        if ((one_per_row or few_in_one_row) and dtype == torch.float32
                and cache.k[0].dtype in (torch.float32, torch.float16)):
            # A few new tokens (<= _SMALL: above that the tile + MKL matmuls win) on a float32 CPU cache: C++
            # decode ops (layer_decode / attn_decode), the tokens as rows: one per cache row, or all in row0
            self.fast = decode_ext() if cache.k[0].device.type == "cpu" else None
            self.row0 = rows.indices(cache.batch_size)[0]
            self.row_stride = 1 if one_per_row else 0
            self.fast_slots = self.slots.expand(B).contiguous() if one_per_row else self.slots.contiguous()
        q = positions[:, :, None]
        k = kpos[:, None, :]
        mask = (k >= 0) & (k <= q)
        if window is not None:
            mask &= (q - k) < window
        # Padding queries see nothing; let them see everything instead of producing NaNs.
        empty = ~mask.any(-1, keepdim=True)
        self.mask = (mask | empty)[:, None]  # [B, 1, T, K]
        # Additive float mask, built once for all layers (SDPA would convert a bool mask per call).
        self.bias = torch.zeros(self.mask.shape, dtype=dtype, device=positions.device)
        self.bias.masked_fill_(~self.mask, float("-inf"))
        if cache is not None and self.fast is not None:
            self.bias2d = self.bias.reshape(B * T, -1)

    def keys_values(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this chunk's k/v [B, H, T, D] in the cache; return all keys/values to attend to."""
        if self.mode == "none":
            return k, v
        ck, cv = self.cache.k[layer][self.rows], self.cache.v[layer][self.rows]
        dt = k.dtype  # the cache may hold another type (f16): attend in the compute dtype
        if self.mode == "shared":
            ck[:, :, self.slots] = k.to(ck.dtype)
            cv[:, :, self.slots] = v.to(cv.dtype)
            return ck[:, :, : self.n_keys].to(dt), cv[:, :, : self.n_keys].to(dt)
        if self.mode == "scatter":
            ck[self.batch_idx, :, self.slots] = k[:, :, 0].to(ck.dtype)
            cv[self.batch_idx, :, self.slots] = v[:, :, 0].to(cv.dtype)
            return ck[:, :, : self.n_keys].to(dt), cv[:, :, : self.n_keys].to(dt)
        k_all = torch.cat([ck[:, :, : self.n_old].to(dt), k], dim=2)
        v_all = torch.cat([cv[:, :, : self.n_old].to(dt), v], dim=2)
        ck[:, :, self.slots] = k[:, :, self.src].to(ck.dtype)
        cv[:, :, self.slots] = v[:, :, self.src].to(cv.dtype)
        return k_all, v_all

    def finish(self) -> None:
        if self.cache is not None:
            self.cache.pos[self.rows] = self.new_pos
            T = self.mask.shape[2]
            for r in range(*self.rows.indices(self.cache.batch_size)):
                self.cache.lengths[r] += T


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, wq: QuantWeight, wk: QuantWeight, wv: QuantWeight, wo: QuantWeight):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: _Plan, layer: int) -> Tensor:
        B, T, _ = x.shape
        if plan.fast is not None:
            qkv = fused_matmul((self.wq, self.wk, self.wv), x, cat=True)
            out = plan.fast.attn_decode(
                qkv.reshape(B * T, -1), cos.reshape(B * T, -1), sin.reshape(B * T, -1), plan.cache.k[layer],
                plan.cache.v[layer], plan.row0, plan.row_stride, plan.fast_slots, plan.bias2d, self.n_heads, self.n_kv,
            )
            return self.wo(out.view(B, T, -1))
        q, k, v = fused_matmul((self.wq, self.wk, self.wv), x)  # one kernel call for GGML weights
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = plan.keys_values(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.bias, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, w1: QuantWeight, w2: QuantWeight, w3: QuantWeight) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x: Tensor) -> Tensor:
        if (fast := _ffn_fast(self, x, (self,))) is not None:
            ext, raws, qts = fast
            return ext.ffn_decode(x.reshape(-1, x.shape[-1]).contiguous(), _EMPTY, raws, qts, 1).view(x.shape)
        gate, up = fused_matmul((self.w1, self.w3), x)
        return self.w2(F.silu(gate) * up)


def _ffn_fast(module: nn.Module, x: Tensor, mlps) -> tuple | None:
    """(extension, raw weights, type ids) when `ffn_decode` can run this feed-forward on x, else None.

    Needs a float32 CPU x of at most `_SMALL` tokens and GGML weights; the raw list is cached on the
    module (and rebuilt if the weights move).
    """
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() > _SMALL * x.shape[-1]:
        return None
    ext = decode_ext()
    if ext is None:
        return None
    key = id(mlps[0].w1._buffers.get("data"))
    cached = module.__dict__.get("_ffn_raw")
    if cached is None or cached[0] != key:
        cached = (key, ffn_raw(mlps))
        module.__dict__["_ffn_raw"] = cached
    return None if cached[1] is None else (ext, *cached[1])


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts: softmax router over all experts, top-k, renormalised.

    Tokens are grouped by expert (one matmul per active expert); inactive experts are not touched.
    `expert_ids`: the experts this module holds when they are spread over ranks (expert parallelism): the
    router still sees all of them, the others' share of the output is computed elsewhere.
    """

    def __init__(self, gate: QuantWeight, experts: list[MLP], top_k: int, expert_ids: list[int] | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.expert_ids = list(expert_ids) if expert_ids is not None else list(range(len(experts)))
        self.partial = expert_ids is not None and len(self.expert_ids) < gate.out_features
        self._local = {e: i for i, e in enumerate(self.expert_ids)}

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if not self.partial and (fast := _ffn_fast(self, x, self.experts)) is not None:
            ext, raws, qts = fast
            logits = self.gate(x).float().contiguous()
            return ext.ffn_decode(x.contiguous(), logits, raws, qts, self.top_k).reshape(shape)
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        if x.shape[0] == 1:  # one token (decode): no grouping needed
            out = torch.zeros_like(x)
            for j, e in enumerate(chosen[0].tolist()):
                if (i := self._local.get(e)) is not None:
                    out = out + self.experts[i](x) * weights[:, j : j + 1]
            return out.reshape(shape)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate.out_features).tolist()
        token_of = order // self.top_k
        w_sorted = weights.reshape(-1)[order, None]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            if (i := self._local.get(e)) is not None:
                idx = token_of[start : start + n]
                out.index_add_(0, idx, self.experts[i](x[idx]) * w_sorted[start : start + n])
            start += n
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, ffn_norm: RMSNorm, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn
        self.fusable = True  # False: always run attention and feed-forward as modules (their hooks run)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, plan: _Plan, layer: int) -> Tensor:
        if plan.fast is not None and (args := self.decode_args()) is not None:
            # One new token per row and GGML weights: the whole layer is one C++ call.
            n = x.shape[0] * x.shape[1]
            y = _layer_decode(plan, args, x.reshape(n, -1), cos.reshape(n, -1), sin.reshape(n, -1), layer)
            return y.view(x.shape)
        x = x + self.attn(self.attn_norm(x), cos, sin, plan, layer)
        return x + self.ffn(self.ffn_norm(x))

    def decode_args(self) -> tuple[tuple, tuple] | None:
        """`layer_decode`'s per-layer arguments (before, after the per-step ones), cached and rebuilt if
        the weights move; None when this layer has weights that are not CPU GGML blocks, or is not `fusable`
        (then the modules run one by one)."""
        if not self.fusable:
            return None
        key = id(self.attn.wq._buffers.get("data"))
        cached = self.__dict__.get("_args")
        if cached is None or cached[0] != key:
            spec = self._build_decode_spec()
            args = None
            if spec is not None:
                attn_raws, attn_qts, router, ffn_raws, ffn_qts, top_k = spec
                args = ((self.attn_norm.weight, self.ffn_norm.weight, self.attn_norm.eps, attn_raws, attn_qts),
                        (self.attn.n_heads, self.attn.n_kv, router, ffn_raws, ffn_qts, top_k))
            cached = (key, args)
            self.__dict__["_args"] = cached
        return cached[1]

    def _build_decode_spec(self) -> tuple | None:
        a = self.attn
        if self.attn_norm.eps != self.ffn_norm.eps:
            return None
        attn = ggml_raw([a.wq, a.wk, a.wv, a.wo])
        if attn is None:
            return None
        if isinstance(self.ffn, MoE):
            gate = self.ffn.gate
            w = gate.weight if isinstance(gate, DenseWeight) else None
            if w is None or w.dtype != torch.float32 or w.device.type != "cpu":
                return None
            router, ffn, top_k = w.contiguous(), ffn_raw(self.ffn.experts), self.ffn.top_k
        else:
            router, ffn, top_k = _EMPTY, ffn_raw([self.ffn]), 1
        return None if ffn is None else (*attn, router, *ffn, top_k)


def _layer_decode(plan: _Plan, args: tuple[tuple, tuple], x: Tensor, cos: Tensor, sin: Tensor, layer: int) -> Tensor:
    """One decoder layer for one new token per row (x, cos, sin: [B, ...]) as one C++ call."""
    before, after = args
    return plan.fast.layer_decode(x, *before, cos, sin, plan.cache.k[layer], plan.cache.v[layer], plan.row0,
                                  plan.row_stride, plan.fast_slots, plan.bias2d, *after)


def check_token_ids(ids: Tensor | Sequence[int], vocab_size: int, what: str = "token") -> None:
    """ValueError naming the first id outside 0..vocab_size-1 (for ids that come from a user, once per request)."""
    t = torch.as_tensor(ids) if not isinstance(ids, Tensor) else ids
    if t.numel() == 0:
        return
    bad = t[(t < 0) | (t >= vocab_size)]
    if bad.numel():
        raise ValueError(f"{what} id {int(bad.reshape(-1)[0])} out of range 0..{vocab_size - 1}")


class Transformer(nn.Module):
    """The decoder body: embeddings -> blocks -> final norm. Returns hidden states [B, T, H]."""

    def __init__(self, cfg: ModelConfig, embed: QuantWeight, layers: list[Block], norm: RMSNorm) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rotary = Rotary(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(
        self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None, rows: slice | None = None
    ) -> Tensor:
        """tokens [B, T]; positions [B, T] absolute positions, -1 for padding (default: row length + arange).

        `rows`: the contiguous range of cache rows this batch uses (default: all of them). Token ids are not
        checked here (a min / max per call is a host sync on a GPU): the entry points that take ids from
        users check them once (`check_token_ids`).
        """
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, T = tokens.shape
        rows = rows if rows is not None else slice(0, B)
        if positions is None:
            if cache is not None:
                start = torch.tensor(cache.lengths[rows], device=tokens.device)[:, None]
            else:
                start = torch.zeros(B, 1, dtype=torch.long, device=tokens.device)
            positions = start + torch.arange(T, device=tokens.device)
        elif positions.device != tokens.device:  # given on the host (the engine's and generate's prompts)
            positions = to_device(positions, tokens.device)
        plan = _Plan(cache, positions, self.cfg.sliding_window, rows, self.dtype)
        x = self.embed.rows(tokens, self.dtype)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        args = [layer.decode_args() for layer in self.layers] if plan.fast is not None else None
        if args is not None and None not in args:
            # decode step, every layer one C++ call: loop here, without the per-module Python overhead
            h, cos, sin = x.reshape(B * T, -1), cos.reshape(B * T, -1), sin.reshape(B * T, -1)
            for i, a in enumerate(args):
                h = _layer_decode(plan, a, h, cos, sin, i)
            x = h.view(B, T, -1)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, plan, i)
        plan.finish()
        return self.norm(x)


class CausalLM(nn.Module):
    """Transformer + language-model head."""

    def __init__(self, model: Transformer, lm_head: QuantWeight) -> None:
        super().__init__()
        self.model = model
        self.lm_head = lm_head

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        rows: slice | None = None,
    ) -> Tensor:
        """Next-token logits [B, T, vocab] (float32), or [B, 1, vocab] with last_only."""
        h = self.model(tokens, positions, cache, rows)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype | None = None,
                  slack: int = 0) -> KVCache:
        """A KV cache for this model; `dtype`: its element type (default: the compute dtype); `slack`: see KVCache."""
        return KVCache(self.cfg, batch_size, max_tokens, dtype or self.model.dtype, self.model.device, slack)


def _last_non_pad(tokens: Tensor, pad_id: int | None) -> Tensor:
    """Index of the rightmost non-padding token per row (transformers' rule); last index without pad_id."""
    if pad_id is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    non_pad = (tokens != pad_id).long()
    idx = torch.arange(tokens.shape[1], device=tokens.device)
    return (idx * non_pad).argmax(-1)


class SequenceClassifier(nn.Module):
    """Score of the last non-padding token, like MixtralForSequenceClassification."""

    def __init__(self, model: Transformer, score: QuantWeight) -> None:
        super().__init__()
        self.model, self.score = model, score

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        if tokens.ndim == 1:
            tokens = tokens[None]
        logits = self.score(self.model(tokens, positions)).float()
        last = _last_non_pad(tokens, self.model.cfg.pad_token_id)
        return logits[torch.arange(tokens.shape[0], device=tokens.device), last]


class TokenClassifier(nn.Module):
    """Per-token scores, like MixtralForTokenClassification (dropout is a no-op at inference)."""

    def __init__(self, model: Transformer, score: QuantWeight) -> None:
        super().__init__()
        self.model, self.score = model, score

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        return self.score(self.model(tokens, positions)).float()


# ---------------------------------------------------------------------------------------- assembly
def build_model(
    cfg: ModelConfig,
    weights: Mapping[str, Tensor | QuantWeight],
    dtype: torch.dtype = torch.float32,
    head: str = "causal_lm",
    sources: Mapping[str, str] | None = None,
    experts: Sequence[int] | None = None,
) -> nn.Module:
    """Assemble a model from canonical-named weights (float tensors or QuantWeights). `experts`: the expert ids
    `weights` holds (expert parallelism; default all).

    Raises WeightsError naming the tensor (and its source in the file, when `sources` says) for a
    missing or mis-shaped weight.
    """
    shapes = expected_shapes(cfg, head)
    held = list(range(cfg.num_experts)) if experts is None else list(experts)
    for name in [k for k in shapes if ".ffn.experts." in k and int(k.split(".")[4]) not in held]:
        del shapes[name]
    sources = sources or {}
    tied = "lm_head" in shapes and "lm_head" not in weights
    if tied:
        shapes.pop("lm_head")

    def get(name: str) -> Tensor | QuantWeight:
        if name not in weights:
            raise WeightsError(f"missing tensor {name!r} ({_describe(name)})")
        w = weights[name]
        got = tuple(w.shape)
        if got != shapes[name]:
            src = f" (from {sources[name]})" if name in sources else ""
            raise WeightsError(f"tensor {name!r}{src} has shape {got}, expected {shapes[name]}")
        return w

    def lin(name: str) -> QuantWeight:
        return as_weight(get(name), dtype)

    def norm(name: str) -> RMSNorm:
        w = get(name)
        if isinstance(w, QuantWeight):
            w = w.dequantize(torch.float32)
        return RMSNorm(w.to(dtype), cfg.rms_norm_eps)

    blocks = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn = Attention(cfg, lin(p + "attn.wq"), lin(p + "attn.wk"), lin(p + "attn.wv"), lin(p + "attn.wo"))
        if cfg.is_moe:
            mlps = [
                MLP(lin(f"{p}ffn.experts.{e}.w1"), lin(f"{p}ffn.experts.{e}.w2"), lin(f"{p}ffn.experts.{e}.w3"))
                for e in held
            ]
            # Router stays float32: its softmax decides which experts run.
            gate = get(p + "ffn.gate")
            ffn: nn.Module = MoE(as_weight(gate, torch.float32), mlps, cfg.num_experts_per_tok,
                                 None if experts is None else held)
        else:
            ffn = MLP(lin(p + "ffn.w1"), lin(p + "ffn.w2"), lin(p + "ffn.w3"))
        blocks.append(Block(norm(p + "attn_norm"), attn, norm(p + "ffn_norm"), ffn))
    embed = lin("embed")
    body = Transformer(cfg, embed, blocks, norm("norm"))
    extra = set(weights) - set(shapes) - {"lm_head"}
    if extra:
        raise WeightsError(f"unexpected tensors: {sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''}")
    if head == "causal_lm":
        return CausalLM(body, embed if tied else lin("lm_head"))
    cls = SequenceClassifier if head == "sequence_classification" else TokenClassifier
    return cls(body, lin("score"))


def _describe(name: str) -> str:
    return "the language-model head" if name == "lm_head" else "required by the config"
