"""AWQ calibration (`levante quantize --awq`): activation-aware scaling (Lin et al., "AWQ", 2023) the way AutoAWQ
does it, layer by layer on levante's own decoder blocks (streamed: one layer's float weights in memory at a
time, see `awq_quantize`):

1. run the decoder layer on the calibration tokens with forward pre-hooks that record the input of
   every linear (for MoE experts: only the tokens routed to that expert);
2. for each group of linears that share an input, grid over alpha in [0, 1): s = mean|x|^alpha
   (normalised by sqrt(max·min)), quantize W·diag(s) (4-bit, asymmetric, per group of G input
   channels, fp16 scales), measure the output MSE ||x W^T - x Q(W diag s)^T / s||^2 summed over the
   group, keep the best alpha (alpha = 0 is round-to-nearest, so the search never does worse than
   RTN on the calibration data). Groups and where 1/s is folded (exact, in float, before
   quantization - the same places as AutoAWQ):
   * wq/wk/wv <- attn_norm weight (the RMSNorm gain),
   * wo <- rows of wv (only when wv and wo are square-compatible, i.e. no GQA, as AutoAWQ),
   * w1/w3 (dense) or all experts' w1/w3 jointly (MoE, one s because they share ffn_norm) <-
     ffn_norm weight; for MoE the router weight's columns are multiplied by s (it stays float), so
     routing is unchanged - AutoAWQ leaves the router unscaled, which perturbs routing,
   * w2 (each expert's own) <- rows of the matching w3 (silu(w1 x)·(w3 x) is linear in w3 x);
3. clipping search (AutoAWQ's auto_clip): per output channel and group, shrink the max |w| by
   1 - i/n_grid for i < max_shrink·n_grid, keep the clamp that minimises the group's partial
   output MSE on up to 512 tokens; skipped for wq/wk (as AutoAWQ: attention scores are sensitive);
4. quantize and pack; the next layer's input is this layer's output with the scaled float weights
   (= the float model, as in AutoAWQ).

Low-rank inputs (`levante compress` output, a low-rank GGUF): a factored matrix W = B @ A stays factored.
A [r, in] and B [out, r] are quantized as two AWQ linears of their own (never B @ A): A reads what W
read, so it joins W's scale group (e.g. the ffn_norm-folded w1/w3 group, or wo <- rows of B_v), B reads
A x and gets its own search with 1/s folded into the rows of A (exact: B diag(s)^-1 diag(s) A); a fold
into "the rows of W" (w2 <- w3, wo <- wv) goes into the rows of B. AWQ needs in_features % group_size
== 0, and B's in_features is the rank: r is zero-padded to a multiple of the group size (and of 8, for
A's packed rows) - zero rows of A and zero columns of B quantize to exact zeros, so this is exact; the
true ranks stay in config.json's `ranks`, and the stored tensors have the padded rank. `levante compress
--rank-multiple <group_size>` picks ranks that need no padding. Factors are written as
`<name>.0.qweight/.qzeros/.scales` (A) and `<name>.1.qweight/...` (B) and `levante.formats.hf` loads them
as `LowRankWeight(AWQWeight A, AWQWeight B)`.

The checkpoint written keeps Hugging Face tensor names (classic per-expert Mixtral names
`block_sparse_moe.experts.E.w1` even when the source used transformers-5 fused experts, as AutoAWQ
/ TheBloke checkpoints and vLLM do), `.qweight/.qzeros/.scales` instead of `.weight` for the
quantized linears, float16 for the rest, config.json with the `quantization_config` block, and the
tokenizer files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import expected_shapes
from ..errors import WeightsError
from ..formats.hf import copy_tokenizer, hf_base_name, hf_config, natural_key
from ..formats.safetensors import save_safetensors
from ..loader import read_checkpoint
from ..model import MLP, Attention, Block, MoE, RMSNorm, Rotary, _Plan
from ..quant.awq import AWQWeight, fake_quantize, quantize_groups
from ..quant.base import QuantWeight, as_weight
from ..quant.lowrank import LowRankWeight
from ..tokenizer import load_tokenizer

SHARD_BYTES = 1 << 30  # awq_quantize: output shard size (a shard is flushed at the layer boundary past it)

# ------------------------------------------------------------------------------- scale and clip search


def _norm_scale(x_mean: Tensor, alpha: float) -> Tensor:
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(pairs: list[tuple[Tensor, Tensor]], x_mean: Tensor, group_size: int, n_grid: int) -> Tensor:
    """Best s (length in) for linears [(W [out, in], X [n, in])] sharing a scale: grid over alpha."""
    refs = [x @ w.T for w, x in pairs]
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for r in range(n_grid):
        s = _norm_scale(x_mean, r / n_grid)
        loss, n = 0.0, 0
        for (w, x), ref in zip(pairs, refs):
            wq = fake_quantize(w * s, group_size) / s
            loss += float((x @ wq.T - ref).pow(2).sum())
            n += ref.numel()
        loss /= max(n, 1)
        if loss < best:
            best, best_s = loss, s
    return best_s


def search_clip(w: Tensor, x: Tensor, group_size: int, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512) -> Tensor:
    """AutoAWQ's auto_clip: W clamped to ±(best shrink of max|w|) per output channel and group."""
    out_f, in_f = w.shape
    ng = in_f // group_size
    step = max(1, x.shape[0] // n_tokens)
    xg = x[::step].reshape(-1, ng, group_size)
    wg = w.reshape(out_f, ng, group_size)
    res = torch.empty_like(wg)
    for a in range(0, out_f, 256):
        wb = wg[a : a + 256]
        org_max = wb.abs().amax(-1, keepdim=True)
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        org_out = torch.einsum("ngk,ogk->nog", xg, wb)
        for i in range(int(max_shrink * n_grid)):
            mv = org_max * (1 - i / n_grid)
            cur = torch.maximum(torch.minimum(wb, mv), -mv)
            qw = fake_quantize(cur.reshape(len(wb), in_f), group_size).reshape(wb.shape)
            err = (torch.einsum("ngk,ogk->nog", xg, qw) - org_out).pow(2).mean(0)[..., None]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, mv, best_max)
        res[a : a + 256] = torch.maximum(torch.minimum(wb, best_max), -best_max)
    return res.reshape(out_f, in_f)


# ------------------------------------------------------------------------------- calibration


def _calib_tokens(calib: str | Sequence[int] | Tensor, ckpt, model_dir: Path, max_tokens: int, seq_len: int) -> Tensor:
    if isinstance(calib, str):
        tok = ckpt.tokenizer
        if tok is None:
            tok = load_tokenizer(model_dir if model_dir.is_dir() else model_dir.parent)
        ids = tok.encode(calib)
    else:
        ids = [int(i) for i in (calib.reshape(-1).tolist() if isinstance(calib, Tensor) else calib)]
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("AWQ calibration needs at least 2 tokens")
    if len(ids) <= seq_len:
        return torch.tensor([ids])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def awq_quantize(
    model_dir: str | Path,
    out_dir: str | Path,
    calib: str | Sequence[int] | Tensor,
    group_size: int = 128,
    n_grid: int = 20,
    *,
    max_calib_tokens: int = 2048,
    seq_len: int = 512,
    clip: bool = True,
    max_loss_tokens: int = 4096,
    force: bool = False,
    progress: bool | Callable[[str], None] = False,
    max_shard_bytes: int = SHARD_BYTES,
    expand_low_rank: bool = False,
) -> Path:
    """Quantize a model (HF dir, or anything `levante.loader.read_checkpoint` reads) to an AWQ
    4-bit GEMM checkpoint in `out_dir`; `calib` is a text (tokenized with the model's tokenizer) or
    token ids. Returns out_dir. See the module docstring for the algorithm.

    Streams, one decoder layer at a time, so peak memory is about one layer's float32 weights plus the
    calibration activations, never the whole float model: the checkpoint stays memory-mapped (HF
    safetensors; GGUF weights stay packed) and each layer's weights are copied to float32 by
    `_load_layer`, built into a `Block`, run on the calibration activations (kept between layers,
    [n_tokens, hidden], as AutoAWQ does), searched, quantized and packed; its packed tensors go to
    the output and its float weights are freed (and the source file's pages released) before the
    next layer. The output is written incrementally as safetensors shards of about `max_shard_bytes`
    (a shard is flushed after the layer that fills it): a single `model.safetensors` when everything
    fits in one, else `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`. Embeddings,
    final norm and lm_head are copied through as float16. The next layer's input is this layer's float
    output (before scaling and quantization), as in AutoAWQ.

    A low-rank input keeps its factors (see the module docstring); `expand_low_rank` re-expands each
    factored matrix to B @ A and quantizes that instead (a plain AWQ checkpoint, as large as the
    uncompressed model's, that vLLM / transformers can load)."""
    say = progress if callable(progress) else ((lambda m: print(m, file=sys.stderr)) if progress else None)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty (use --force to overwrite)")
    if out_dir.exists() and model_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"AWQ: the output directory {out_dir} is the input model's directory")
    t0 = time.time()
    ckpt = read_checkpoint(model_dir, torch.float32)  # lazy: memory-mapped tensors / packed weights
    cfg, src = ckpt.config, ckpt.weights
    _check_weights(cfg, src, ckpt.sources, group_size)
    # canonical name -> true rank of the factored matrices kept factored
    ranks = {} if expand_low_rank else {k: w.true_rank for k, w in src.items() if isinstance(w, LowRankWeight)}
    rank_pad = math.lcm(group_size, 8)  # B's in_features (the rank) % group size, A's rows % 8
    tokens = _calib_tokens(calib, ckpt, model_dir, max_calib_tokens, seq_len)
    B, T = tokens.shape
    gen = torch.Generator().manual_seed(0)
    release = ckpt.release or (lambda: None)
    n_quantized = 0

    def sub(x: Tensor) -> Tensor:  # a fixed subsample of rows for the loss (bounded cost)
        if x.shape[0] <= max_loss_tokens:
            return x
        return x[torch.randperm(x.shape[0], generator=gen)[:max_loss_tokens].sort().values]

    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, max_shard_bytes)
    try:
        with torch.no_grad():
            positions = torch.arange(T)[None].expand(B, T)
            x = _embed_rows(src["embed"], tokens)
            writer.add(hf_base_name("embed") + ".weight", _to_half(src["embed"]))
            cos, sin = Rotary(cfg).cos_sin(positions, torch.float32)
            plan = _Plan(None, positions, cfg.sliding_window, slice(0, B))
            for li in range(cfg.num_layers):
                p = f"layers.{li}."
                # this layer's float32 weights (own memory); factored matrices as `.a` / `.b` factors
                lw = _load_layer(src, p, rank_pad) if ranks else _load_layer(src, p)
                blk = _build_block(cfg, lw, p)  # shares lw's storage: the folds below edit lw in place
                X, x = _capture(blk, lambda b=blk, i=li, h=x: b(h, cos, sin, plan, i))  # x: the float output,
                quantized = _awq_layer(blk, X, cfg.is_moe, cfg.num_experts, group_size, n_grid, clip, sub)
                del X, blk  # x is the next layer's input (AutoAWQ's propagation)
                writer.add_layer(lw, quantized, p)
                n_quantized += len(quantized)
                del lw, quantized
                writer.flush_if_full()
                release()  # the source pages of this layer leave the process's RSS
                if say:
                    say(f"awq: layer {li + 1}/{cfg.num_layers} done ({time.time() - t0:.0f} s)")
            del x
            for k in ("norm", "lm_head"):  # lm_head absent: tied to the embeddings
                if k in src:
                    writer.add(hf_base_name(k) + ".weight", _to_half(src[k]))
            release()
        files = writer.finish()
    except BaseException:
        writer.abort()
        raise
    src_cfg = model_dir / "config.json"
    conf = json.loads(src_cfg.read_text()) if model_dir.is_dir() and src_cfg.is_file() else hf_config(cfg)
    conf["torch_dtype"] = "float16"
    conf.pop("ranks", None)
    if ranks:  # the true ranks (the stored factors are zero-padded to a multiple of rank_pad)
        conf["ranks"] = {hf_base_name(n): r for n, r in sorted(ranks.items(), key=lambda kv: natural_key(kv[0]))}
    conf["quantization_config"] = {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["gate"] if cfg.is_moe else None,
    }
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2))
    for note in copy_tokenizer(model_dir, out_dir):  # HF dir: copy the files; GGUF: convert its tokenizer
        if say:
            say(f"awq: {note}")
    if say:
        lr = f", {len(ranks)} low-rank matrices kept as quantized A / B factors" if ranks else ""
        say(f"awq: wrote {out_dir} ({n_quantized} quantized linears{lr}, {len(files)} shard(s), "
            f"{time.time() - t0:.0f} s)")
    return out_dir


def _to_float32(w: Tensor | QuantWeight) -> Tensor:
    """A float32 copy with its own memory of a checkpoint weight (memory-mapped tensor or packed weight)."""
    if isinstance(w, QuantWeight):
        return w.dequantize(torch.float32).clone()
    return w.to(torch.float32, copy=True)


def _to_half(w: Tensor | QuantWeight) -> Tensor:
    """float16 copy of an unquantized weight (for a float tensor: the same values as via float32)."""
    if isinstance(w, QuantWeight):
        return w.dequantize(torch.float32).to(torch.float16)
    return w.to(torch.float16, copy=True)


def _embed_rows(embed: Tensor | QuantWeight, tokens: Tensor) -> Tensor:
    """float32 embedding rows of `tokens` [B, T] -> [B, T, hidden] (= DenseWeight(float32 embed).rows)."""
    if isinstance(embed, QuantWeight):
        return F.embedding(tokens, embed.dequantize(torch.float32))
    return F.embedding(tokens, embed).to(torch.float32)  # gather, then widen: exact, no float32 table


def _load_layer(src: dict[str, Tensor | QuantWeight], prefix: str, rank_pad: int | None = None) -> dict[str, Tensor]:
    """The float32 weights of one decoder layer (canonical names starting with `prefix`, e.g. "layers.3.").

    With `rank_pad`, a `LowRankWeight` W = B @ A becomes two entries `<name>.a` (A [r', in]) and `<name>.b`
    (B [out, r']), its true rank r zero-padded to r' = a multiple of `rank_pad` (exact: zero rows of A, zero
    columns of B); without, it is expanded to B @ A."""
    out = {}
    for k, w in src.items():
        if not k.startswith(prefix):
            continue
        if rank_pad is not None and isinstance(w, LowRankWeight):
            out[k + ".a"], out[k + ".b"] = _padded_factors(w, rank_pad)
        else:
            out[k] = _to_float32(w)
    return out


def _padded_factors(w: LowRankWeight, rank_pad: int) -> tuple[Tensor, Tensor]:
    """float32 (A, B) of a low-rank weight at its true rank, zero-padded along the rank to a multiple of rank_pad."""
    r = w.true_rank
    rp = -(-r // rank_pad) * rank_pad
    a_src, b_src = (f.dequantize(torch.float32) if isinstance(f, QuantWeight) else f for f in (w.a, w.b))
    a = torch.zeros(rp, w.in_features)
    b = torch.zeros(w.out_features, rp)
    a[:r] = a_src[:r]
    b[:, :r] = b_src[:, :r]
    return a, b


def _build_block(cfg, lw: dict[str, Tensor], p: str):
    """One decoder `Block` on float32 weights, assembled as `levante.model.build_model` does (sharing
    `lw`'s storage: DenseWeight / RMSNorm keep the tensors they are given)."""
    def lin(n: str) -> QuantWeight:
        if p + n + ".a" in lw:  # factored: the float factors, so A and B are calibrated as linears of their own
            return LowRankWeight(as_weight(lw[p + n + ".a"], torch.float32), as_weight(lw[p + n + ".b"], torch.float32))
        return as_weight(lw[p + n], torch.float32)

    def norm(n: str) -> RMSNorm:
        return RMSNorm(lw[p + n].to(torch.float32), cfg.rms_norm_eps)

    attn = Attention(cfg, lin("attn.wq"), lin("attn.wk"), lin("attn.wv"), lin("attn.wo"))
    if cfg.is_moe:
        experts = [MLP(lin(f"ffn.experts.{e}.w1"), lin(f"ffn.experts.{e}.w2"), lin(f"ffn.experts.{e}.w3"))
                   for e in range(cfg.num_experts)]
        ffn = MoE(lin("ffn.gate"), experts, cfg.num_experts_per_tok)
    else:
        ffn = MLP(lin("ffn.w1"), lin("ffn.w2"), lin("ffn.w3"))
    return Block(norm("attn_norm"), attn, norm("ffn_norm"), ffn)


def _check_weights(cfg, src: dict, sources: dict[str, str], group_size: int) -> None:
    """What the whole-model path checked before calibrating (group-size fit, then `build_model`'s
    missing / mis-shaped / unexpected tensor errors), on the lazy weights, before any work."""
    for k, w in src.items():
        shape = tuple(w.shape)
        if len(shape) == 2 and k not in ("embed", "lm_head") and not k.endswith("ffn.gate"):
            if shape[1] % group_size or shape[0] % 8:
                raise ValueError(f"AWQ: {k} {shape}: in_features must be a multiple of the group size "
                                 f"{group_size} and out_features of 8")
    shapes = expected_shapes(cfg)
    if "lm_head" not in src:
        shapes.pop("lm_head")
    for name, want in shapes.items():
        if name not in src:
            what = "the language-model head" if name == "lm_head" else "required by the config"
            raise WeightsError(f"missing tensor {name!r} ({what})")
        if tuple(src[name].shape) != want:
            where = f" (from {sources[name]})" if name in sources else ""
            raise WeightsError(f"tensor {name!r}{where} has shape {tuple(src[name].shape)}, expected {want}")
    extra = set(src) - set(shapes)
    if extra:
        raise WeightsError(f"unexpected tensors: {sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''}")


class _ShardWriter:
    """Safetensors output written as it is produced: tensors are buffered until about `max_bytes`, then
    written as a shard (`flush_if_full`, called at layer boundaries); `finish` names the shards the
    Hugging Face way (one file: model.safetensors; more: model-0000i-of-0000n + the index)."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max(1, int(max_bytes))
        self.pending: dict[str, Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names)
        self.total = 0
        for f in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json",
                  *out_dir.glob(".awq-part-*.safetensors")]:  # --force: stale outputs would be read
            f.unlink(missing_ok=True)

    def add(self, name: str, t: Tensor) -> None:
        self.pending[name] = t
        self.pending_bytes += t.numel() * t.element_size()

    def add_layer(self, lw: dict[str, Tensor], quantized: dict[str, AWQWeight], prefix: str) -> None:
        """One layer's tensors: packed triplets for the quantized linears, float16 for the rest (norms with
        1/s folded in, the MoE router with its columns scaled by s)."""
        for k, w in lw.items():
            if k.endswith((".a", ".b")):  # a low-rank factor: HF `<name>.0` (A) / `<name>.1` (B)
                b = hf_base_name(k[:-2]) + (".0" if k.endswith(".a") else ".1")
            else:
                b = hf_base_name(k)
            q = quantized.get(k[len(prefix):])
            if q is not None:
                qw, qz, sc = q.packed()
                self.add(b + ".qweight", qw)
                self.add(b + ".qzeros", qz)
                self.add(b + ".scales", sc)
            else:
                self.add(b + ".weight", w.to(torch.float16))

    def flush_if_full(self) -> None:
        if self.pending_bytes >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f".awq-part-{len(self.parts):05d}.safetensors"
        save_safetensors(self.pending, path, metadata={"format": "pt"})
        self.parts.append((path, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        self._flush()
        n = len(self.parts)
        if n == 1:
            dst = self.out_dir / "model.safetensors"
            self.parts[0][0].replace(dst)
            return [dst]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self.parts):
            dst = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.replace(dst)
            files.append(dst)
            weight_map.update({k: dst.name for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return files

    def abort(self) -> None:
        for tmp, _ in self.parts:
            tmp.unlink(missing_ok=True)
        self.pending = {}


def _capture(blk: torch.nn.Module, run: Callable[[], Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Inputs [rows, in] of every linear of `blk` (MoE experts: the tokens routed to them) during run(),
    and run()'s result."""
    feats: dict[str, list[Tensor]] = {}

    def hook(name: str):
        return lambda _m, a: feats.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).float())

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in blk.named_modules() if isinstance(m, QuantWeight)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in feats.items()}, out


def _awq_layer(blk, X: dict[str, Tensor], is_moe: bool, n_experts: int, group_size: int, n_grid: int, clip: bool,
               sub: Callable[[Tensor], Tensor]) -> dict[str, AWQWeight]:
    """Scale search + folding, clipping and quantization of one decoder block (float weights edited in place).

    A factored linear `n` (a LowRankWeight over float factors) is quantized as its two factors `n.a` (input:
    n's input) and `n.b` (input: A x, derived here from n's captured input with the unscaled A)."""
    lr = {n for n, m in blk.named_modules() if isinstance(m, LowRankWeight)}
    W = {n: m.weight for n, m in blk.named_modules()
         if isinstance(m, QuantWeight) and not isinstance(m, LowRankWeight) and n != "ffn.gate"}
    X = dict(X)
    for n in lr:
        if n in X:
            X[n + ".a"] = X[n]
            X[n + ".b"] = F.linear(X[n], W[n + ".a"])
    xin: dict[str, Tensor] = {n: sub(X[n]) for n in W if n in X}  # per-linear loss inputs (subsampled)

    def first(n: str) -> str:  # the linear that reads n's input
        return n + ".a" if n in lr else n

    def last(n: str) -> str:  # the linear whose rows are n's output channels
        return n + ".b" if n in lr else n

    def scale_group(names: list[str], stat_src: Tensor, prev: list[tuple[Tensor, int]],
                    x_mean: Tensor | None = None) -> None:
        active = [n for n in names if n in xin]  # MoE experts no calibration token reached are left out
        if not active:
            return
        if x_mean is None:
            x_mean = stat_src.abs().mean(0)
        s = search_scale([(W[n], xin[n]) for n in active], x_mean, group_size, n_grid)
        for t, dim in prev:  # fold 1/s into the producer of the input (norm gain or rows of a linear)
            if dim == 0:
                t.div_(s.view(-1, *([1] * (t.ndim - 1))))
            else:
                t.mul_(s)  # router columns: its input shrinks by s, so its weight grows by s
        for n in names:  # every consumer of the folded input, routed tokens or not
            W[n].mul_(s)
            if n in xin:
                xin[n] = xin[n] / s

    def factor_group(n: str) -> None:  # B of a factored n: its input A x, 1/s folded into the rows of A
        if n not in lr or n + ".b" not in X:
            return
        x_mean = X[n + ".b"].abs().mean(0)
        live = x_mean > 0  # zero columns: the rank padding; keep them out of _norm_scale's min
        if bool(live.any()) and not bool(live.all()):
            x_mean = torch.where(live, x_mean, x_mean[live].mean())
        scale_group([n + ".b"], X[n + ".b"], [(W[n + ".a"], 0)], x_mean)

    attn = ["attn.wq", "attn.wk", "attn.wv"]
    scale_group([first(n) for n in attn], X["attn.wq"], [(blk.attn_norm.weight, 0)])
    for n in attn:
        factor_group(n)
    if W[last("attn.wv")].shape[0] == W[first("attn.wo")].shape[1]:  # no GQA: fold into v_proj rows (as AutoAWQ)
        scale_group([first("attn.wo")], X["attn.wo"], [(W[last("attn.wv")], 0)])
    factor_group("attn.wo")
    if is_moe:
        ex = [f"ffn.experts.{e}." for e in range(n_experts)]
        scale_group([first(p + w) for p in ex for w in ("w1", "w3")], X["ffn.gate"],
                    [(blk.ffn_norm.weight, 0), (blk.ffn.gate.weight, 1)])
    else:
        ex = ["ffn."]
        scale_group([first("ffn.w1"), first("ffn.w3")], X["ffn.w1"], [(blk.ffn_norm.weight, 0)])
    for p in ex:
        factor_group(p + "w1")
        factor_group(p + "w3")
    for p in ex:
        if p + "w2" in X:
            scale_group([first(p + "w2")], X[p + "w2"], [(W[last(p + "w3")], 0)])
            factor_group(p + "w2")
    out = {}
    for n, w in W.items():
        if clip and n in xin and n.removesuffix(".a").removesuffix(".b") not in ("attn.wq", "attn.wk"):
            w.copy_(search_clip(w, xin[n], group_size, n_grid))
        q, z, s = quantize_groups(w, group_size)
        out[n] = AWQWeight.from_codes(q.reshape(w.shape).to(torch.uint8), z[..., 0].to(torch.uint8), s[..., 0],
                                      group_size)
    return out


