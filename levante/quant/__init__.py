"""Weight formats. Each is a `QuantWeight`: the model calls `matmul` / `rows` and never asks which."""

from .base import DenseWeight, QuantWeight, as_weight

__all__ = ["DenseWeight", "QuantWeight", "as_weight"]
