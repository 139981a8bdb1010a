"""Mistral's original checkpoints: params.json + consolidated*.safetensors (or consolidated*.pth).

wq / wk are stored in the interleaved rotary layout (Mistral's reference rotates adjacent pairs);
levante, like transformers, uses rotate-half, so their rows are permuted at load.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ..config import ModelConfig, read_json
from ..errors import WeightsError
from ..shard import Shard
from . import Checkpoint
from .safetensors import SafetensorsFile

_TOP = {"tok_embeddings.weight": "embed", "norm.weight": "norm", "output.weight": "lm_head"}
_LAYER = {
    "attention_norm.weight": "attn_norm",
    "ffn_norm.weight": "ffn_norm",
    "attention.wq.weight": "attn.wq",
    "attention.wk.weight": "attn.wk",
    "attention.wv.weight": "attn.wv",
    "attention.wo.weight": "attn.wo",
    "feed_forward.w1.weight": "ffn.w1",
    "feed_forward.w2.weight": "ffn.w2",
    "feed_forward.w3.weight": "ffn.w3",
    "feed_forward.gate.weight": "ffn.gate",
    "block_sparse_moe.gate.weight": "ffn.gate",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^feed_forward\.experts\.(\d+)\.(w[123])\.weight$")
_STACKED_RE = re.compile(r"^block_sparse_moe\.(w[123])$")


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """Row permutation from interleaved rotary pairs to rotate-half (transformers' converter)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def half_to_interleaved(w, n_heads: int):
    """Inverse of `interleaved_to_half` (what llama.cpp's converter and Mistral's layout store).

    Works on torch tensors and numpy arrays alike (both have reshape / swapaxes).
    """
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def _files(directory: Path) -> list[Path]:
    st = sorted(directory.glob("consolidated*.safetensors"))
    if st:
        return st
    pth = sorted(directory.glob("consolidated*.pth")) + sorted(directory.glob("consolidated*.pt"))
    if pth:
        return pth
    raise WeightsError(f"{directory}: no consolidated*.safetensors or consolidated*.pth weights found")


def _iter_tensors(path: Path):
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        for name in f.keys():
            yield name, f.get(name)
        return
    try:
        # weights_only: a .pth is a pickle; never execute code from it.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt pickles/zips
        raise WeightsError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(sd).__name__}")
    yield from sd.items()


def read_mistral(directory: str | Path, dtype: torch.dtype = torch.float32, shard: Shard | None = None) -> Checkpoint:
    """Read a consolidated Mistral / Mixtral checkpoint directory; `shard`: only this rank's slices (levante.shard)."""
    directory = Path(directory)
    cfg = ModelConfig.from_mistral_params(read_json(directory / "params.json", "params.json"),
                                          str(directory / "params.json"))
    shard = shard.for_config(cfg) if shard is not None else None
    weights: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    files = _files(directory)
    for path in files:
        for name, t in _iter_tensors(path):
            src = f"{path.name}:{name}"
            if name in _TOP:
                weights[_TOP[name]] = t
                sources[_TOP[name]] = src
                continue
            m = _LAYER_RE.match(name)
            if not m:
                raise WeightsError(f"{src}: unexpected tensor name")
            layer, rest = int(m.group(1)), m.group(2)
            p = f"layers.{layer}."
            if rest in _LAYER:
                canon = p + _LAYER[rest]
                if rest == "attention.wq.weight":
                    t = interleaved_to_half(t, cfg.num_heads)
                elif rest == "attention.wk.weight":
                    t = interleaved_to_half(t, cfg.num_kv_heads)
                weights[canon], sources[canon] = t, src
            elif e := _EXPERT_RE.match(rest):
                canon = f"{p}ffn.experts.{e.group(1)}.{e.group(2)}"
                weights[canon], sources[canon] = t, src
            elif s := _STACKED_RE.match(rest):
                _split_stacked(weights, sources, cfg, p, s.group(1), t, src)
            else:
                raise WeightsError(f"{src}: unexpected tensor name")
    if shard is not None:
        shard.cut_all(weights, sources)
    info = {"files": [p.name for p in files]}
    return Checkpoint(cfg, weights, "mistral-consolidated", sources=sources, info=info)


def _split_stacked(weights, sources, cfg: ModelConfig, prefix: str, kind: str, t: Tensor, src: str) -> None:
    """The original Mixtral release: w1/w2/w3 stacked to [E*ff, dim]; w2 pieces are transposed."""
    E, ff, dim = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    if tuple(t.shape) != (E * ff, dim):
        raise WeightsError(f"{src}: stacked expert tensor has shape {tuple(t.shape)}, expected {(E * ff, dim)}")
    for e, piece in enumerate(t.split(ff, dim=0)):
        canon = f"{prefix}ffn.experts.{e}.{kind}"
        weights[canon] = piece.t() if kind == "w2" else piece
        sources[canon] = src
