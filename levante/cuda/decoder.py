"""The GPU decode path: a static KV cache, Triton attention, and one CUDA graph per batch bucket.

`CudaDecoder` wraps a built `CausalLM` (weights packed and MoE fused by `levante.cuda.to_device`) and offers the
two calls generation makes, `new_cache(rows, tokens)` and `decoder(tokens, positions, cache, last_only=True)`,
with the model's numbers but GPU-shaped work:
- the cache is preallocated, [rows, kv heads, capacity + 1, head_dim] per layer, slot = position (or a ring
  buffer of the window for sliding-window models; the extra slot takes the writes of left-padding tokens), and
  reused across calls while it is big enough, so its addresses, and the graphs captured over them, stay valid;
  the warm-up's cache stays beside a bigger batch's, so an LLM alternating single prompts and lists keeps both;
- attention is `cache_attention` (no mask tensor, no per-length planning: the lengths are data); the residual
  adds and norms, RoPE with the cache writes, and the feed-forward's activation are one kernel each
  (levante.cuda.triton_fused), so a layer is ~13 kernels rather than ~40;
- prompts of several lengths (left-padded rows) prefill packed, as vLLM runs them: the projections, norms and the
  feed-forward see only the real tokens, attention and the cache writes keep the padded layout;
- in steps of up to GEMV_ROWS tokens of a 16-bit model, the activations that only packed weights read (the norms'
  outputs, the attention's, the feed-forward's activation) are stored as float32, holding the same values: the
  GEMV's products are float32 either way, and the GPU's Triton (3.6) multiplies float32 x without converting it
  per weight (`packed_readers`);
- a decode step (one token per row) runs for the smallest bucket (1, 2, 4, 8, 16, 32, ...) holding the batch; on
  CUDA each bucket's step is captured once in a CUDA graph and replayed with new token ids and positions copied
  into its static inputs: no host sync inside a step, only the logits come out (sampling then runs on them on the
  GPU and copies back the chosen ids). Without CUDA (the tests, under TRITON_INTERPRET=1) the same step runs
  eagerly, so the bucket and padding logic is tested everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ContextLengthError, DeviceMemoryError
from ..kv import RowCache
from ..quant.base import DenseWeight, QuantWeight
from ..transfer import to_device
from .moe import FusedMoE
from .packed import PackedWeight
from .precompile import precompile_decoder
from .triton_attention import cache_attention
from .triton_fused import add_rms_norm, rope_and_cache, silu_mul
from .triton_matmul import packed_matmul, use_gemv

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int) -> int:
    """The smallest bucket holding n rows (multiples of 256 beyond the list)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


def free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can take on a CUDA device (free memory plus what torch holds unused); None
    elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_fits(what: str, nbytes: int, device: torch.device, free: int | None, hint: str) -> None:
    """DeviceMemoryError naming `what` when nbytes exceed `free` (None: not known, no check)."""
    if free is not None and nbytes > free:
        raise DeviceMemoryError(f"{what} needs {nbytes / 2**30:.2f} GiB, and {device} has {free / 2**30:.2f} GiB "
                                f"free: {hint}")


RING_CHUNK = 512  # a ring buffer's slots beyond the window: the most tokens one forward call writes at once


class StaticCache(RowCache):
    """Keys and values of `rows` sequences, preallocated; slot `capacity` is the padding tokens' dump.

    Slot = position, or, for a sliding-window model whose context is longer than its window plus RING_CHUNK
    (Mistral-7B v0.1: window 4096, n_ctx up to 32k), a ring buffer: slot = position % capacity with capacity =
    window + max(slack, RING_CHUNK), so the cache holds what the window can see instead of the whole context. A
    forward call then writes at most capacity - window + 1 tokens at once (the decoder cuts longer chunks), and a
    row that wrapped can give back at most that many (`truncate`), as levante.model.KVCache's rolling buffer.

    `lengths`: positions held per row, kept by the calls that let the decoder place the tokens (positions=None,
    the serving engine's way), or set by `hold` after a call at explicit positions; `truncate` / `reset` /
    `swap_rows` are the engine's KVCache operations. Slots past a row's length may hold stale keys: no query sees a
    slot beyond its own position, so they need no clearing.
    """

    def __init__(self, cfg, rows: int, max_tokens: int, dtype: torch.dtype, device: torch.device,
                 free: int | None = None, slack: int = 0) -> None:
        """`max_tokens` per row (slack included); `free`: the device's free bytes (default: asked of CUDA); a cache
        bigger than that is refused with a DeviceMemoryError saying what to lower, before anything is allocated."""
        window = cfg.sliding_window
        ring = window + max(slack, RING_CHUNK) if window else max_tokens
        self.rolling = ring < max_tokens
        self.window = window if self.rolling else None
        capacity = ring if self.rolling else max_tokens
        shape = (rows, cfg.num_kv_heads, capacity + 1, cfg.head_dim)
        nbytes = 2 * cfg.num_layers * rows * cfg.num_kv_heads * (capacity + 1) * cfg.head_dim * dtype.itemsize
        check_fits(f"the KV cache ({rows} rows x {capacity} positions, {cfg.num_layers} layers, {dtype})", nbytes,
                   torch.device(device), free if free is not None else free_bytes(torch.device(device)),
                   "lower the context (n_ctx, --ctx-size) or the batch (--max-batch)")
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.rows, self.capacity, self.max_tokens, self.slack, self.dtype = rows, capacity, max_tokens, slack, dtype
        self.active = rows  # rows in use by the current generation
        self.lengths = [0] * rows
        self.graphs: dict[int, tuple] = {}  # batch bucket -> its decode step captured over these buffers
        self.nbytes = nbytes

    def fits(self, rows: int, max_tokens: int, dtype: torch.dtype, slack: int = 0) -> bool:
        """Whether `rows` (a bucket) of `max_tokens` (+ `slack`) positions of `dtype` fit this cache as it is."""
        return (self.rows >= rows and self.max_tokens >= max_tokens + slack and self.slack >= slack
                and self.dtype == dtype)

    @property
    def batch_size(self) -> int:
        return self.active

    def select_rows(self, keep: Tensor) -> None:
        """Keep rows `keep` (in that order) as rows 0..len(keep)-1, in place (captured graphs hold the addresses)."""
        n = keep.numel()
        for t in self.k + self.v:
            t[:n] = t.index_select(0, keep)
        self.active = n

    def reset(self, row: int | None = None) -> None:
        for r in range(self.rows) if row is None else [row]:
            self.lengths[r] = 0

    def truncate(self, row: int, n_steps: int) -> None:
        self.check_take_back(row, n_steps)
        self.lengths[row] = min(self.lengths[row], n_steps)

    def hold(self, row: int, n_steps: int) -> None:
        """Row `row` now holds positions 0..n_steps-1, written by a call at explicit positions (the serving engine's
        prefill of several rows at once)."""
        self.lengths[row] = n_steps


def fused_qkv(attn: nn.Module) -> QuantWeight | None:
    """q, k and v of an attention module as one weight (float of one dtype, or packed of one format), made once
    and kept on the module; the three weights become views of it. None when their formats differ (Q4_K_M's v)."""
    if "_qkv" not in attn.__dict__:
        ws = [attn.wq, attn.wk, attn.wv]
        fused: QuantWeight | None = None
        if all(isinstance(w, DenseWeight) for w in ws) and len({(w.weight.dtype, w.in_features) for w in ws}) == 1:
            whole = torch.cat([w.weight for w in ws])
            start = 0
            for w in ws:
                w._buffers["weight"] = whole[start : start + w.out_features]
                start += w.out_features
            fused = DenseWeight(whole)
        elif all(isinstance(w, PackedWeight) for w in ws) and len({(w.qtype, w.in_features) for w in ws}) == 1:
            fused = PackedWeight.concat(ws)
        attn.__dict__["_qkv"] = fused
    return attn.__dict__["_qkv"]


class CudaDecoder(nn.Module):
    """Generation's view of a CausalLM on the GPU (see the module docstring)."""

    def __init__(self, lm: nn.Module, use_graphs: bool | None = None, float32_inputs: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.model = lm.model  # generation reads model.model.device
        if use_graphs is None:
            # an unfused MoE (a weight kind the fused one lacks) syncs with the host: it runs eagerly; so does a
            # step with hooks (a parallel rank's all-reduces: a collective captured in a graph is not verified)
            unfused = any(hasattr(layer.ffn, "experts") for layer in lm.model.layers)
            hooked = any(layer.attn._forward_hooks or layer.ffn._forward_hooks for layer in lm.model.layers)
            use_graphs = lm.model.device.type == "cuda" and not unfused and not hooked
        self.use_graphs = use_graphs
        # generation launches the next step before reading this one's tokens back (levante.generate): on a GPU the
        # host's streaming overlaps the step; on CPU it would only add a wasted last step
        self.pipelined = self.model.device.type == "cuda"
        # a serving engine prefills several new rows in one call, each at its own positions (slot = position here)
        self.batched_prefill = True
        # left-padded rows prefill packed (`real_tokens`); False: padding computed too (the benchmark's comparison)
        self.pack_prompts = True
        # the warm-up's cache (one row of the whole context for an LLM; the engine's batch) stays while a bigger
        # batch's cache comes and goes, so that alternating calls do not reallocate caches and recapture graphs
        self._warm: StaticCache | None = None
        self._cache: StaticCache | None = None  # the latest other one
        # decode steps store the activations that only packed weights read as float32 (their values unchanged):
        # Triton 3.6's one-row GEMV then reads x without converting it, 8.3 -> 6.5 lane-instructions per Q4_K weight
        self.float32_inputs = float32_inputs
        self._readers: tuple | None = None
        self.precompiled: dict | None = None  # the last warm-up's report of kernels compiled ahead

    @property
    def cfg(self):
        return self.lm.cfg

    def new_cache(self, batch_size: int, max_tokens: int, dtype: torch.dtype | None = None,
                  slack: int = 0) -> StaticCache:
        """A cache for `batch_size` rows of up to `max_tokens` tokens: the warm-up's or the latest one when it is
        big enough (no clearing needed: a query never sees a slot beyond its own position; their graphs stay
        valid), else a new one in place of the latest (the warm-up's too when the device lacks memory for both)."""
        dtype = dtype or self.model.dtype
        rows = bucket_for(batch_size)
        c = next((c for c in (self._warm, self._cache) if c is not None and c.fits(rows, max_tokens, dtype, slack)),
                 None)
        if c is None:
            self._cache = None  # freed before its successor is allocated
            try:
                c = StaticCache(self.cfg, rows, max_tokens + slack, dtype, self.model.device, slack=slack)
            except DeviceMemoryError:
                if self._warm is None:
                    raise
                self._warm = None
                c = StaticCache(self.cfg, rows, max_tokens + slack, dtype, self.model.device, slack=slack)
            self._cache = c
        c.active = batch_size
        c.reset()
        return c

    def warm_up(self, max_rows: int, max_tokens: int, dtype: torch.dtype | None = None, precompile: bool = True,
                verify: Sequence[int] = (), slack: int = 0) -> StaticCache:
        """Allocate the cache for up to `max_rows` rows of `max_tokens` (+ `slack`, `new_cache`'s) and capture the
        decode step of every bucket up to bucket_for(max_rows) now (Triton compiles, graphs), as vLLM does at
        start-up, so that the first generation does not pay for it. Generations that fit reuse both. `precompile`:
        first compile, in a pool of processes, the kernels of every bucket's decode step (also those not captured
        now: a bigger batch then only captures its graph), of prefills (levante.cuda.precompile.WARM_PREFILLS: one
        prompt of any length, or several) and of speculative decoding's verification calls of `verify` tokens."""
        dtype = dtype or self.model.dtype
        if self._warm is not None and not self._warm.fits(bucket_for(max_rows), max_tokens, dtype, slack):
            self._warm = None  # replaced: not held beside its successor
        cache = self._warm = self.new_cache(max_rows, max_tokens, dtype, slack)
        buckets = [b for b in BUCKETS if b <= cache.rows]
        if precompile and self.model.device.type == "cuda":
            self.precompiled = precompile_decoder(self, BUCKETS, max_tokens, cache.dtype, slack, verify=verify)
        if self.use_graphs:
            dev = self.model.device
            for b in buckets:
                if b not in cache.graphs:
                    with torch.inference_mode():
                        self._capture(b, cache)
            torch.cuda.synchronize(dev)
        return cache

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: StaticCache | None = None,
                last_only: bool = False, rows: slice | None = None) -> Tensor:
        """Logits [B, T or 1, vocab] (float32) of tokens [B, T] at positions [B, T] (-1: padding) in cache rows
        `rows` (default 0..B-1); positions=None: each row's next ones, after its `lengths`. Positions may be on the
        host (as a batch's prompts are laid out): they go to the device without waiting for it, and left-padded
        rows find their real tokens there rather than by reading the positions back (`real_tokens`)."""
        if cache is None or not isinstance(cache, StaticCache):
            return self.lm(tokens, positions, cache, last_only, rows)
        if tokens.ndim == 1:
            tokens = tokens[None]
        host = None
        if positions is not None and positions.device.type == "cpu":
            host, positions = positions, to_device(positions, tokens.device)
        B, T = tokens.shape
        row0 = 0 if rows is None else rows.indices(cache.rows)[0]
        if row0 + B > cache.rows:
            raise ValueError(f"rows {row0}..{row0 + B - 1} are not in a cache of {cache.rows}")
        if positions is None:
            held = cache.lengths[row0 : row0 + B]
            if max(held) + T > cache.max_tokens:
                raise ContextLengthError(f"context overflow: {max(held)} cached + {T} new tokens > n_ctx "
                                         f"{cache.max_tokens}")
            host = torch.tensor(held, dtype=torch.long)[:, None] + torch.arange(T)
            positions = to_device(host, tokens.device)
            for r in range(row0, row0 + B):
                cache.lengths[r] += T
        if T == 1 and row0 == 0:
            return self._decode(tokens, positions, cache)
        n = cache.write_limit
        if T > n:  # a ring buffer: chunks it can hold without overwriting keys their first queries see
            parts = [self._prefill(tokens[:, i : i + n], positions[:, i : i + n], cache, last_only, row0,
                                   None if host is None else host[:, i : i + n])
                     for i in range(0, T, n)]
            return parts[-1] if last_only else torch.cat(parts, dim=1)
        return self._prefill(tokens, positions, cache, last_only, row0, host)

    def _prefill(self, tokens: Tensor, positions: Tensor, cache: StaticCache, last_only: bool, row0: int,
                 host: Tensor | None = None) -> Tensor:
        """Several tokens per row: left-padded rows run packed (`real_tokens`, from `host`, the positions' host
        copy, where the caller gave one)."""
        keep = real_tokens(positions, host) if self.pack_prompts else None
        return self._step(tokens, positions, cache, last_only, row0, keep)

    def _decode(self, tokens: Tensor, positions: Tensor, cache: StaticCache) -> Tensor:
        """One token per row, for the batch's bucket; the padding rows (position -1) see nothing and write only
        the dump slot, so rows past the batch (a server's cached prefixes) are left as they are."""
        B = tokens.shape[0]
        b = bucket_for(B)
        if b > cache.rows:
            raise ValueError(f"{B} rows do not fit a cache of {cache.rows}")
        if not self.use_graphs:
            tok = torch.zeros(b, 1, dtype=tokens.dtype, device=tokens.device)
            pos = torch.full((b, 1), -1, dtype=positions.dtype, device=positions.device)
            tok[:B], pos[:B] = tokens, positions
            return self._step(tok, pos, cache, True)[:B]
        graph = cache.graphs.get(b)
        if graph is None:
            graph = self._capture(b, cache)
        g, tok, pos, out = graph
        tok.zero_()
        pos.fill_(-1)
        tok[:B].copy_(tokens, non_blocking=True)
        pos[:B].copy_(positions, non_blocking=True)
        g.replay()
        return out[:B]

    def _capture(self, b: int, cache: StaticCache) -> tuple:
        """Capture the decode step of bucket b over `cache` (warmed up first: Triton compiles outside the graph)."""
        dev = self.model.device
        tok = torch.zeros(b, 1, dtype=torch.long, device=dev)
        pos = torch.full((b, 1), -1, dtype=torch.long, device=dev)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(tok, pos, cache, True)
        torch.cuda.current_stream(dev).wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = self._step(tok, pos, cache, True)
        cache.graphs[b] = (g, tok, pos, out)
        return cache.graphs[b]

    def _step(self, tokens: Tensor, positions: Tensor, cache: StaticCache, last_only: bool, row0: int = 0,
              keep: Tensor | None = None) -> Tensor:
        """The model's forward over cache rows row0.., device ops only (capturable): per layer, the residual add
        and norm, RoPE and the cache writes, and the feed-forward's small ops are one kernel each
        (levante.cuda.triton_fused). `keep` (the flat indices of the real tokens of a left-padded [B, T], see
        `real_tokens`): the step runs packed, as vLLM runs prompts of several lengths: the projections, norms and
        the feed-forward (the MoE's routing and experts included) see only those N tokens ([1, N, ...]); RoPE, the
        cache writes and attention keep the padded layout (their padding costs next to nothing: it writes the dump
        slot, and a query block of padding sees no key)."""
        net = self.model
        cfg = net.cfg
        B, T = tokens.shape
        n = B * T if keep is None else keep.numel()
        dt = net.dtype
        wide = self.float32_inputs and dt != torch.float32 and use_gemv(n, packed=True)
        if self._readers is None:
            self._readers = packed_readers(net, self.lm.lm_head, dt)
        layers_in, head_in = self._readers

        def store(packed_only: bool) -> torch.dtype | None:
            return torch.float32 if wide and packed_only else None

        x = net.embed.rows(tokens if keep is None else tokens.reshape(-1).index_select(0, keep)[None], dt)
        start = (positions[:, -1] - (T - 1)).to(torch.int32)  # left padding: a row's real positions end the chunk
        ring = cache.capacity if cache.rolling else 0
        delta = None  # the previous block's output: added to x by the next norm's kernel
        for i, layer in enumerate(net.layers):
            a = layer.attn
            qkv_in, wo_in, ffn_in, act = layers_in[i]
            x, h = add_rms_norm(x, delta, layer.attn_norm.weight, layer.attn_norm.eps, store(qkv_in))
            qkv = fused_qkv(a)
            if qkv is not None:  # one matmul
                q, k, v = spread(linear(qkv, h, dt), keep, B, T).split(
                    [a.wq.out_features, a.wk.out_features, a.wv.out_features], dim=-1)
            else:
                q, k, v = (spread(linear(w, h, dt), keep, B, T) for w in (a.wq, a.wk, a.wv))
            ck, cv = cache.k[i][row0 : row0 + B], cache.v[i][row0 : row0 + B]
            # RoPE (angles made in the kernel) and the k / v writes; padding tokens write the dump slot
            q = rope_and_cache(q, k, v, positions, net.rotary.inv_freq, ck, cv, a.n_heads, a.n_kv, cache.capacity, ring)
            # [B, H, T, D] over a [B, T, H, D] buffer
            # packed: attention stores 16-bit values as a padded prefill does (the kernel it compiled), and only the
            # real rows are widened for a GEMV (the same values)
            o = cache_attention(q, ck, cv, start, cfg.sliding_window, ring=ring,
                                store=store(wo_in) if keep is None else None)
            o = gather(o.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim), keep).to(store(wo_in) or o.dtype)
            o = run_hooks(a, h, linear(a.wo, o, dt))
            x, h = add_rms_norm(x, o, layer.ffn_norm.weight, layer.ffn_norm.eps, store(ffn_in))
            delta = feed_forward(layer.ffn, h, dt, store(act))
        if last_only and keep is None:
            x, delta = x[:, -1:], delta[:, -1:]
        elif last_only:  # each row's last column (a row that is all padding in this chunk: any token, unused)
            ends = torch.searchsorted(keep, torch.arange(1, B + 1, device=keep.device) * T - 1).clamp_(max=n - 1)
            x, delta = x[0, ends][:, None], delta[0, ends][:, None]
        # the head's rows (packed: B last tokens, maybe more than the N <= GEMV_ROWS the layers saw) choose its kernel
        head_store = store(head_in) if use_gemv(x.shape[0] * x.shape[1], packed=True) else None
        _, h = add_rms_norm(x, delta, net.norm.weight, net.norm.eps, head_store)
        if self.lm.lm_head is None:  # a parallel model's worker rank: rank 0 alone computes the logits
            return h if last_only else spread(h, keep, B, T)
        out = linear(self.lm.lm_head, h, dt).float()
        return out if last_only else spread(out, keep, B, T)


def real_tokens(positions: Tensor, host: Tensor | None = None) -> Tensor | None:
    """The flat indices, on positions' device, of the real tokens (position >= 0) of several left-padded rows
    [B, T] when some are padding, else None: one row (a prompt, a speculative verification: never padded), no
    padding, or the meta device (a dry run: values unknown). They are found in `host`, the positions' host copy,
    where given (the engine's and generate's prompts); else in the positions themselves, which on a GPU reads
    them back (a sync: the host waits for every step queued before)."""
    if positions.shape[0] == 1 or positions.device.type == "meta":
        return None
    found = host if host is not None else positions
    keep = (found.reshape(-1) >= 0).nonzero().squeeze(1)
    if keep.numel() == positions.numel():
        return None
    return to_device(keep, positions.device)


def gather(t: Tensor, keep: Tensor | None) -> Tensor:
    """t [B, T, F] of a padded step as [1, N, F], its `keep` tokens' rows (t itself without keep)."""
    return t if keep is None else t.reshape(-1, t.shape[-1]).index_select(0, keep)[None]


def spread(t: Tensor, keep: Tensor | None, B: int, T: int) -> Tensor:
    """t [1, N, F] of a packed step back in the padded layout [B, T, F], zeros at the padding (t without keep)."""
    if keep is None:
        return t
    return t.new_zeros(B * T, t.shape[-1]).index_copy_(0, keep, t.reshape(-1, t.shape[-1])).view(B, T, -1)


def run_hooks(module: nn.Module, h: Tensor, out: Tensor) -> Tensor:
    """`out`, computed by the decoder in place of calling `module` on h, through the module's forward hooks (a
    parallel rank's all-reduce of its partial attention output), as calling it would have."""
    for hook in module._forward_hooks.values():
        result = hook(module, (h,), out)
        if result is not None:
            out = result
    return out


def is_mlp(ffn: nn.Module) -> bool:
    """A levante.model.MLP (w1, w2, w3; recognised by its parts: the model sits a layer above)."""
    return all(hasattr(ffn, n) for n in ("w1", "w2", "w3")) and not hasattr(ffn, "gate")


def feed_forward(ffn: nn.Module, h: Tensor, dtype: torch.dtype | None = None, store: torch.dtype | None = None
                 ) -> Tensor:
    """A block's feed-forward on h, in the activations' `dtype` (default h's; h may be float32 holding such values
    where `packed_readers` says so): a SwiGLU MLP with its activation fused (silu_mul, stored as `store`); a
    FusedMoE's top-k outputs [..., k, D], left for the next add + norm to sum; any other module, or one with
    hooks, called as it is."""
    dtype = dtype or h.dtype
    if ffn._forward_hooks:
        return ffn(h)
    if isinstance(ffn, FusedMoE):
        return ffn.parts(h, dtype, store)
    if is_mlp(ffn):
        return linear(ffn.w2, silu_mul(linear(ffn.w1, h, dtype), linear(ffn.w3, h, dtype), store), dtype)
    return ffn(h)


def linear(w: QuantWeight, h: Tensor, dtype: torch.dtype) -> Tensor:
    """w(h) in `dtype`; h is float32 holding values of `dtype` only where w is packed (`packed_readers`)."""
    if h.dtype != dtype:
        return packed_matmul(h, w, out_dtype=dtype)
    return w(h)


def packed_readers(net: nn.Module, head: QuantWeight | None, dtype: torch.dtype) -> tuple[list[tuple], bool]:
    """Which of a decode step's activations only packed weights read (they may then be stored as float32, with
    their values: a GEMV reads float32 x with fewer instructions on the GPU's Triton): per layer, (the attention
    norm's output: q, k and v; the attention's: the output projection; the feed-forward norm's: the router and
    the experts' gate and up, or the MLP's w1 and w3; the activation between them: the down projection), and the
    final norm's (the LM head). A module with hooks (a parallel rank's feed-forward) is called as it is, on its
    usual input."""
    def packed(*ws: QuantWeight) -> bool:
        return all(isinstance(w, PackedWeight) for w in ws)

    layers = []
    for layer in net.layers:
        a, ffn = layer.attn, layer.ffn
        qkv = fused_qkv(a)
        attn = (packed(qkv) if qkv is not None else packed(a.wq, a.wk, a.wv)), packed(a.wo)
        if ffn._forward_hooks:
            layers.append((*attn, False, False))
        elif isinstance(ffn, FusedMoE):
            layers.append((*attn, *(ffn.reads_float32(dtype),) * 2))
        elif is_mlp(ffn):
            layers.append((*attn, packed(ffn.w1, ffn.w3), packed(ffn.w2)))
        else:
            layers.append((*attn, False, False))
    return layers, head is not None and packed(head)
