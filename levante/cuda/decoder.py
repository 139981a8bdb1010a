"""The GPU decode path: a static KV cache, Triton attention, and one CUDA graph per batch bucket.

`CudaDecoder` wraps a built `CausalLM` (weights packed and MoE fused by `levante.cuda.to_device`) and offers the
two calls generation makes, `new_cache(rows, tokens)` and `decoder(tokens, positions, cache, last_only=True)`,
with the model's numbers but GPU-shaped work:
- the cache is preallocated, [rows, kv heads, capacity + 1, head_dim] per layer, slot = position (the extra slot
  takes the writes of left-padding tokens), and reused across calls while it is big enough, so its addresses,
  and the graphs captured over them, stay valid;
- attention is `cache_attention` (no mask tensor, no per-length planning: the lengths are data);
- a decode step (one token per row) runs for the smallest bucket (1, 2, 4, 8, 16, 32, ...) holding the batch; on
  CUDA each bucket's step is captured once in a CUDA graph and replayed with new token ids and positions copied
  into its static inputs: no host sync inside a step, only the logits come out (sampling then runs on them on the
  GPU and copies back the chosen ids). Without CUDA (the tests, under TRITON_INTERPRET=1) the same step runs
  eagerly, so the bucket and padding logic is tested everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..rope import apply_rotary
from .triton_attention import cache_attention

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int) -> int:
    """The smallest bucket holding n rows (multiples of 256 beyond the list)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


class StaticCache:
    """Keys and values of `rows` sequences at slot = position; slot `capacity` is the padding tokens' dump."""

    def __init__(self, cfg, rows: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, cfg.num_kv_heads, capacity + 1, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.rows, self.capacity, self.dtype = rows, capacity, dtype
        self.active = rows  # rows in use by the current generation

    @property
    def batch_size(self) -> int:
        return self.active

    def select_rows(self, keep: Tensor) -> None:
        """Keep rows `keep` (in that order) as rows 0..len(keep)-1, in place (captured graphs hold the addresses)."""
        n = keep.numel()
        for t in self.k + self.v:
            t[:n] = t.index_select(0, keep)
        self.active = n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class CudaDecoder(nn.Module):
    """Generation's view of a CausalLM on the GPU (see the module docstring)."""

    def __init__(self, lm: nn.Module, use_graphs: bool | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.model = lm.model  # generation reads model.model.device
        self.use_graphs = lm.model.device.type == "cuda" if use_graphs is None else use_graphs
        self._cache: StaticCache | None = None
        self._graphs: dict[int, tuple] = {}

    @property
    def cfg(self):
        return self.lm.cfg

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype | None = None,
                  slack: int = 0) -> StaticCache:
        """The decoder's cache, for `batch_size` rows of up to `max_tokens` tokens: the one it has when it is big
        enough (no reset needed: a query never sees a slot beyond its own position), else a bigger one."""
        dtype = dtype or self.model.dtype
        rows = bucket_for(batch_size)
        c = self._cache
        if c is None or c.rows < rows or c.capacity < max_tokens + slack or c.dtype != dtype:
            self._cache = c = None
            self._graphs.clear()
            c = StaticCache(self.cfg, rows, max_tokens + slack, dtype, self.model.device)
            self._cache = c
        c.active = batch_size
        return c

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: StaticCache | None = None,
                last_only: bool = False, rows: slice | None = None) -> Tensor:
        """Logits [B, T or 1, vocab] (float32) of tokens [B, T] at positions [B, T] (-1: padding)."""
        if cache is None or not isinstance(cache, StaticCache):
            return self.lm(tokens, positions, cache, last_only, rows)
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, T = tokens.shape
        if positions is None:
            raise ValueError("the static cache needs explicit positions")
        if T == 1:
            return self._decode(tokens, positions, cache)
        return self._step(tokens, positions, cache, last_only)

    def _decode(self, tokens: Tensor, positions: Tensor, cache: StaticCache) -> Tensor:
        """One token per row, for the batch's bucket (padding rows write only their own rows' slot 0)."""
        B = tokens.shape[0]
        b = bucket_for(B)
        if b > cache.rows:
            raise ValueError(f"{B} rows do not fit a cache of {cache.rows}")
        if not self.use_graphs:
            tok = torch.zeros(b, 1, dtype=tokens.dtype, device=tokens.device)
            pos = torch.zeros(b, 1, dtype=positions.dtype, device=positions.device)
            tok[:B], pos[:B] = tokens, positions
            return self._step(tok, pos, cache, True)[:B]
        graph = self._graphs.get(b)
        if graph is None:
            graph = self._capture(b, cache)
        g, tok, pos, out = graph
        tok.zero_()
        pos.zero_()
        tok[:B].copy_(tokens, non_blocking=True)
        pos[:B].copy_(positions, non_blocking=True)
        g.replay()
        return out[:B]

    def _capture(self, b: int, cache: StaticCache) -> tuple:
        """Capture the decode step of bucket b over `cache` (warmed up first: Triton compiles outside the graph)."""
        dev = self.model.device
        tok = torch.zeros(b, 1, dtype=torch.long, device=dev)
        pos = torch.zeros(b, 1, dtype=torch.long, device=dev)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(tok, pos, cache, True)
        torch.cuda.current_stream(dev).wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self._step(tok, pos, cache, True)
        self._graphs[b] = (g, tok, pos, out)
        return self._graphs[b]

    def _step(self, tokens: Tensor, positions: Tensor, cache: StaticCache, last_only: bool) -> Tensor:
        """The model's forward over the static cache: device ops only (capturable)."""
        net = self.model
        cfg = net.cfg
        B, T = tokens.shape
        x = net.embed.rows(tokens, net.dtype)
        cos, sin = net.rotary.cos_sin(positions, x.dtype)
        start = (positions[:, -1] - (T - 1)).to(torch.int32)  # left padding: a row's real positions end the chunk
        slots = torch.where(positions < 0, cache.capacity, positions)  # padding writes go to the dump slot
        row = torch.arange(B, device=tokens.device)[:, None]
        for i, layer in enumerate(net.layers):
            a = layer.attn
            h = layer.attn_norm(x)
            q = a.wq(h).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
            k = a.wk(h).view(B, T, a.n_kv, a.head_dim).transpose(1, 2)
            v = a.wv(h).view(B, T, a.n_kv, a.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin).transpose(1, 2)
            cache.k[i][row, :, slots] = k.to(cache.dtype)
            cache.v[i][row, :, slots] = v.to(cache.dtype)
            o = cache_attention(q.contiguous(), cache.k[i], cache.v[i], start, cfg.sliding_window)
            x = x + a.wo(o.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim).to(x.dtype))
            x = x + layer.ffn(layer.ffn_norm(x))
        if last_only:
            x = x[:, -1:]
        return self.lm.lm_head(net.norm(x)).float()
