"""Rotary position embedding: the base inverse frequencies, their linear / llama3 scalings, and the rotation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def base_inv_freq(head_dim: int, theta: float) -> Tensor:
    """1 / theta^(2i / head_dim) for i < head_dim / 2, float32 (transformers' arithmetic)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def llama3_inv_freq(inv_freq: Tensor, sc: dict[str, Any]) -> Tensor:
    """Llama 3.1's rope scaling: long wavelengths divided by `factor`, a smooth blend in between."""
    factor = float(sc["factor"])
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, out)


def inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """The inverse frequencies a model uses: base, then its `rope_scaling` (linear or llama3) if any."""
    f = base_inv_freq(head_dim, theta)
    sc = scaling or {}
    rtype = sc.get("rope_type", sc.get("type"))
    if rtype == "linear":
        return f / float(sc["factor"])
    if rtype == "llama3":
        return llama3_inv_freq(f, sc)
    return f


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE with the sign folded into `sin` (see levante.model.Rotary.cos_sin)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
