"""Write transformers Llama / Mistral / Mixtral models as GGUF files the way llama.cpp's converter does.

`write_gguf_from_hf(hf_model, path, qtype=...)`: names (`token_embd`, `blk.N.attn_q`, ...), `llama.*`
keys, wq / wk permuted into the interleaved rotary layout, MoE experts merged into
`blk.N.ffn_{gate,up,down}_exps` (or the old per-expert `blk.N.ffn_gate.E` layout). Norms and the
router stay F32 (as llama.cpp keeps them); every other tensor is stored in `qtype`.
Knobs for corrupt-file tests: `arch`, `drop_keys`, `override_keys`, `tensor_types`, `extra_tensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy().copy()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute: HF rotate-half rows -> interleaved pairs."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def hf_experts(sd: dict[str, torch.Tensor], p: str, n_exp: int) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """(router [E, H], per-expert {w1, w2, w3}) from a transformers state dict (fused v5 or classic)."""
    if p + "mlp.experts.gate_up_proj" in sd:
        gu, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        ff = gu.shape[1] // 2
        experts = [{"w1": _np(gu[e, :ff]), "w3": _np(gu[e, ff:]), "w2": _np(down[e])} for e in range(n_exp)]
        return _np(sd[p + "mlp.gate.weight"]), experts
    experts = [
        {w: _np(sd[p + f"block_sparse_moe.experts.{e}.{w}.weight"]) for w in ("w1", "w2", "w3")} for e in range(n_exp)
    ]
    return _np(sd[p + "block_sparse_moe.gate.weight"]), experts


def gguf_tensors(hf_model, layout: str = "merged") -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 numpy array (wq/wk already permuted)."""
    cfg = hf_model.config
    sd = hf_model.state_dict()
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    n_exp = getattr(cfg, "num_local_experts", 0) if cfg.model_type == "mixtral" else 0
    out = {
        "token_embd.weight": _np(sd["model.embed_tokens.weight"]),
        "output_norm.weight": _np(sd["model.norm.weight"]),
    }
    if not getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" in sd:
        out["output.weight"] = _np(sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = _np(sd[p + "input_layernorm.weight"])
        out[b + "attn_q.weight"] = permute_qk(_np(sd[p + "self_attn.q_proj.weight"]), n_head)
        out[b + "attn_k.weight"] = permute_qk(_np(sd[p + "self_attn.k_proj.weight"]), n_kv)
        out[b + "attn_v.weight"] = _np(sd[p + "self_attn.v_proj.weight"])
        out[b + "attn_output.weight"] = _np(sd[p + "self_attn.o_proj.weight"])
        out[b + "ffn_norm.weight"] = _np(sd[p + "post_attention_layernorm.weight"])
        if n_exp:
            gate, experts = hf_experts(sd, p, n_exp)
            out[b + "ffn_gate_inp.weight"] = gate
            for w, kind in (("w1", "ffn_gate"), ("w3", "ffn_up"), ("w2", "ffn_down")):
                if layout == "merged":
                    out[b + f"{kind}_exps.weight"] = np.stack([ex[w] for ex in experts])
                else:
                    for e, ex in enumerate(experts):
                        out[b + f"{kind}.{e}.weight"] = ex[w]
        else:
            out[b + "ffn_gate.weight"] = _np(sd[p + "mlp.gate_proj.weight"])
            out[b + "ffn_up.weight"] = _np(sd[p + "mlp.up_proj.weight"])
            out[b + "ffn_down.weight"] = _np(sd[p + "mlp.down_proj.weight"])
    return out


def hf_metadata(hf_model) -> dict[str, Any]:
    """The llama.* keys llama.cpp's converter writes for this model."""
    cfg = hf_model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = float(getattr(cfg, "rope_theta", None) or rp.get("rope_theta", 10000.0))
    md: dict[str, Any] = {
        "llama.vocab_size": cfg.vocab_size,
        "llama.context_length": cfg.max_position_embeddings,
        "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers,
        "llama.feed_forward_length": cfg.intermediate_size,
        "llama.rope.dimension_count": hd,
        "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.rope.freq_base": theta,
        "llama.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
    }
    if hd != cfg.hidden_size // cfg.num_attention_heads:
        md["llama.attention.key_length"] = hd
        md["llama.attention.value_length"] = hd
    if cfg.model_type == "mixtral":
        md["llama.expert_count"] = cfg.num_local_experts
        md["llama.expert_used_count"] = cfg.num_experts_per_tok
    return md


def _add_kv(w, key: str, val: Any) -> None:
    from gguf import GGUFValueType as V

    if isinstance(val, bool):
        w.add_key_value(key, val, V.BOOL)
    elif isinstance(val, int):
        w.add_key_value(key, val, V.UINT32)
    elif isinstance(val, float):
        w.add_key_value(key, val, V.FLOAT32)
    elif isinstance(val, str):
        w.add_key_value(key, val, V.STRING)
    elif isinstance(val, (list, tuple)):
        if not val:
            return
        sub = {str: V.STRING, float: V.FLOAT32, bool: V.BOOL, int: V.INT32}[type(val[0])]
        w.add_key_value(key, list(val), V.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"{key}: cannot write {type(val)}")


def encode_tensor(a: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """float32 array -> (array to hand GGUFWriter.add_tensor, raw_dtype)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype == "F32":
        return a.astype(np.float32), None
    if qtype == "F16":
        return a.astype(np.float16), None
    if qtype.endswith("_K"):  # gguf-py has no K-quant quantizers; levante's are byte-identical to llama.cpp's
        from levante.quant.kquants import quantize_k

        return quantize_k(a.astype(np.float32), qtype), T[qtype]
    return quantize(a.astype(np.float32), T[qtype]), T[qtype]


def write_gguf_from_hf(
    hf_model,
    path: str | Path,
    qtype: str = "F32",
    tokenizer_fields: dict[str, Any] | None = None,
    layout: str = "merged",
    arch: str = "llama",
    drop_keys: tuple[str, ...] = (),
    override_keys: dict[str, Any] | None = None,
    tensor_types: dict[str, str] | None = None,
    extra_tensors: dict[str, tuple[np.ndarray, str]] | None = None,
    drop_tensors: tuple[str, ...] = (),
    name: str = "tiny test model",
) -> Path:
    """Write `hf_model` as a GGUF file; returns the path.

    tensor_types: per-tensor qtype overrides; extra_tensors: name -> (raw uint8 blocks or float
    array, qtype) written as is (e.g. an IQ4_NL tensor for unsupported-type tests).
    """
    import gguf

    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(_file_type(qtype))
    md = hf_metadata(hf_model)
    md.update(tokenizer_fields or {})
    md.update(override_keys or {})
    for k, v in md.items():
        if k not in drop_keys:
            _add_kv(w, k, v)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k in drop_keys:
        for d in w.kv_data:
            d.pop(k, None)
    tensor_types = tensor_types or {}
    for tname, a in gguf_tensors(hf_model, layout).items():
        if tname in drop_tensors:
            continue
        t = tensor_types.get(tname)
        if t is None:
            t = "F32" if a.ndim == 1 or tname.endswith("ffn_gate_inp.weight") else qtype
        arr, raw = encode_tensor(a, t)
        w.add_tensor(tname, arr, raw_dtype=raw)
    for tname, (arr, t) in (extra_tensors or {}).items():
        w.add_tensor(tname, arr, raw_dtype=gguf.GGMLQuantizationType[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _file_type(qtype: str) -> int:
    from gguf.constants import LlamaFileType

    if qtype == "F32":
        return int(LlamaFileType.ALL_F32)
    members = LlamaFileType.__members__
    return int(members.get(f"MOSTLY_{qtype}") or members[f"MOSTLY_{qtype}_M"])  # Q4_K -> Q4_K_M
