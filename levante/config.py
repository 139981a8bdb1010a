"""Model hyper-parameters, independent of the file format they were read from."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingConfigError

SUPPORTED_MODEL_TYPES = ("mixtral", "mistral", "llama")


@dataclass
class ModelConfig:
    """Everything the model code needs. `num_experts == 0` means a dense SwiGLU MLP."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim in (0, None):
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts {self.num_experts}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ readers
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config.json dict (model_type mixtral, mistral or llama)."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError(f"{source}: attention_bias / mlp_bias are not supported")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")

        def req(key: str) -> Any:
            if key not in d:
                raise ConfigError(f"{source}: missing required key {key!r}")
            return d[key]

        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = dict(rope)
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in ("default", "llama3", "linear"):
                raise ConfigError(f"{source}: rope scaling type {rtype!r} is not supported")
            if rtype == "default":
                scaling = None
        n_heads = int(req("num_attention_heads"))
        experts = int(d.get("num_local_experts", 0) or 0) if mt == "mixtral" else 0
        id2label = {int(k): v for k, v in (d.get("id2label") or {}).items()}
        num_labels = d.get("num_labels") or (len(id2label) if id2label else 2)
        return cls(
            vocab_size=int(req("vocab_size")),
            hidden_size=int(req("hidden_size")),
            intermediate_size=int(req("intermediate_size")),
            num_layers=int(req("num_hidden_layers")),
            num_heads=n_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or 0),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            sliding_window=(int(d["sliding_window"]) if d.get("sliding_window") and mt != "llama" else None),
            num_experts=experts,
            num_experts_per_tok=int(d.get("num_experts_per_tok", 2)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            model_type=mt,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            num_labels=int(num_labels),
            id2label=id2label,
        )

    @classmethod
    def from_mistral_params(cls, d: dict[str, Any], source: str = "params.json") -> ModelConfig:
        """Build from Mistral's original params.json."""
        for key in ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"):
            if key not in d:
                raise ConfigError(f"{source}: missing required key {key!r}")
        moe = d.get("moe") or {}
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["dim"]),
            intermediate_size=int(d["hidden_dim"]),
            num_layers=int(d["n_layers"]),
            num_heads=int(d["n_heads"]),
            num_kv_heads=int(d.get("n_kv_heads") or d["n_heads"]),
            head_dim=int(d.get("head_dim") or 0),
            rms_norm_eps=float(d.get("norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            max_position_embeddings=int(d.get("max_seq_len", d.get("max_position_embeddings", 32768))),
            sliding_window=int(d["sliding_window"]) if d.get("sliding_window") else None,
            num_experts=int(moe.get("num_experts", 0)),
            num_experts_per_tok=int(moe.get("num_experts_per_tok", 2)),
            tie_word_embeddings=bool(d.get("tied_embeddings", False)),
            model_type="mixtral" if moe else "mistral",
            bos_token_id=1,
            eos_token_id=2,
        )


def read_json(path: Path, what: str = "config") -> dict[str, Any]:
    """Read a JSON file, turning every failure into a ConfigError naming the file."""
    if not path.is_file():
        raise MissingConfigError(f"missing {what}: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------- tensor shapes
HEADS = ("causal_lm", "sequence_classification", "token_classification")


def expected_shapes(cfg: ModelConfig, head: str = "causal_lm") -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes. `lm_head` may be absent when embeddings are tied."""
    H, hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, H), "norm": (H,)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm"] = (H,)
        shapes[p + "ffn_norm"] = (H,)
        shapes[p + "attn.wq"] = (cfg.num_heads * hd, H)
        shapes[p + "attn.wk"] = (cfg.num_kv_heads * hd, H)
        shapes[p + "attn.wv"] = (cfg.num_kv_heads * hd, H)
        shapes[p + "attn.wo"] = (H, cfg.num_heads * hd)
        ffns = [p + "ffn."]
        if cfg.is_moe:
            shapes[p + "ffn.gate"] = (cfg.num_experts, H)
            ffns = [p + f"ffn.experts.{e}." for e in range(cfg.num_experts)]
        for f in ffns:
            shapes[f + "w1"] = (cfg.intermediate_size, H)
            shapes[f + "w3"] = (cfg.intermediate_size, H)
            shapes[f + "w2"] = (H, cfg.intermediate_size)
    if head == "causal_lm":
        shapes["lm_head"] = (cfg.vocab_size, H)
    elif head in ("sequence_classification", "token_classification"):
        shapes["score"] = (cfg.num_labels, H)
    else:
        raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
    return shapes
