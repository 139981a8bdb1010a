"""File formats. Each reader turns a path into a `Checkpoint`: config + canonical-named weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..config import ModelConfig
from ..quant.base import QuantWeight


@dataclass
class Checkpoint:
    """What a format reader returns; `levante.model.build_model` turns it into a model.

    `weights` uses the canonical names of `levante.config.expected_shapes`; `sources` maps a
    canonical name to "file:tensor" for error messages; `info` holds facts for `levante info`.
    """

    config: ModelConfig
    weights: dict[str, Tensor | QuantWeight]
    format: str
    tokenizer: Any = None  # levante.tokenizer.Tokenizer | None
    sources: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    # Drops the resident pages of memory-mapped weights (re-read from disk when touched again); set by
    # readers whose weights are read-only file mappings, used by streaming passes over large checkpoints.
    release: Callable[[], None] | None = None
