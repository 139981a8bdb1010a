"""Hugging Face model directories: config.json + model.safetensors (single or sharded).

Reading (`read_hf`), and the naming / config / tokenizer helpers the tools that write HF directories share
(`levante compress`, `levante quantize --awq`)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig, read_json
from ..errors import WeightsError
from ..shard import Shard
from . import Checkpoint
from .safetensors import SafetensorsFile

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attn.wq",
    "self_attn.k_proj.weight": "attn.wk",
    "self_attn.v_proj.weight": "attn.wv",
    "self_attn.o_proj.weight": "attn.wo",
    "mlp.gate_proj.weight": "ffn.w1",
    "mlp.up_proj.weight": "ffn.w3",
    "mlp.down_proj.weight": "ffn.w2",
    "block_sparse_moe.gate.weight": "ffn.gate",
    "mlp.gate.weight": "ffn.gate",  # transformers >= 5 in-memory naming
}
_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head",
        "score.weight": "score"}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.bias$)")
# Low-rank factor pairs `<name>.0.weight` (A [r, in]) and `<name>.1.weight` (B [out, r]) of a linear weight
# `<name>.weight`, as written by `levante compress` (FORMATS.md "Low-rank Mixtral checkpoints").
_LOWRANK = re.compile(r"^(.+)\.([01])\.weight$")


def hf_name(name: str) -> str | None:
    """Canonical name for a Hugging Face tensor name (None for fused tensors handled separately)."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.match(name)
    if not m:
        return None
    layer, rest = m.groups()
    if rest in _LAYER_MAP:
        return f"layers.{layer}.{_LAYER_MAP[rest]}"
    e = _EXPERT.match(rest)
    if e:
        return f"layers.{layer}.ffn.experts.{e.group(1)}.{e.group(2)}"
    return None


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a HF directory, following model.safetensors.index.json when present."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "safetensors index")
        wm = data.get("weight_map")
        if not isinstance(wm, dict):
            raise WeightsError(f"{index}: missing 'weight_map'")
        files = sorted({directory / f for f in wm.values()})
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index} lists shard {f.name}, which does not exist")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{directory}: no *.safetensors weights found (.bin checkpoints are not supported)")
    return files


def read_hf(directory: str | Path, dtype: torch.dtype = torch.float32, shard: Shard | None = None) -> Checkpoint:
    """Read a HF directory (model_type mixtral / mistral / llama) into a Checkpoint; `shard`: only this rank's
    slices of the split weights (see levante.shard)."""
    directory = Path(directory)
    raw_cfg = read_json(directory / "config.json", "config.json")
    cfg = ModelConfig.from_hf_dict(raw_cfg, str(directory / "config.json"))
    shard = shard.for_config(cfg) if shard is not None else None
    weights: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    file_dtypes: set[str] = set()
    lowrank: dict[str, dict[str, Tensor]] = {}  # low-rank factor pairs: canonical name -> {"0": A, "1": B}
    lowrank_base: dict[str, str] = {}  # canonical name -> HF module name (the key of config.json `ranks`)
    # AWQ (AutoAWQ GEMM) checkpoints: each quantized linear is a .qweight/.qzeros/.scales triplet
    # instead of .weight; collect the triplets here and turn them into AWQWeights after the loop.
    qc = raw_cfg.get("quantization_config") or {}
    awq_parts: dict[str, dict[str, Tensor]] | None = {} if qc.get("quant_method") == "awq" else None
    files: list[SafetensorsFile] = []
    for path in shard_files(directory):
        st = SafetensorsFile(path)
        files.append(st)
        for name in st.keys():
            file_dtypes.add(st.dtype(name))
            if awq_parts is not None and name.endswith((".qweight", ".qzeros", ".scales")):
                base, _, part = name.rpartition(".")
                awq_parts.setdefault(base, {})[part] = st.get(name)
                sources[base] = f"{path.name}:{base}.{{qweight,qzeros,scales}}"
                continue
            canon = hf_name(name)
            if canon is not None:
                weights[canon] = st.get(name)
                sources[canon] = f"{path.name}:{name}"
                continue
            lr = _LOWRANK.match(name)
            if lr and hf_name(lr.group(1) + ".weight") is not None:  # one factor of a low-rank weight
                canon = hf_name(lr.group(1) + ".weight")
                lowrank.setdefault(canon, {})[lr.group(2)] = st.get(name)
                lowrank_base[canon] = lr.group(1)
                sources[canon] = f"{path.name}:{lr.group(1)}.{{0,1}}.weight"
                continue
            fused = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
            if fused:
                _split_fused(weights, sources, cfg, int(fused.group(1)), fused.group(2), st.get(name), path.name)
            elif not _IGNORED.search(name):
                raise WeightsError(f"{path.name}: unexpected tensor {name!r} for model_type {cfg.model_type}")
    if shard is not None:
        shard.cut_all(weights, sources)
        if awq_parts:
            _shard_awq(shard, awq_parts, qc)
        for canon in list(lowrank):
            if not shard.holds(canon):
                del lowrank[canon]
                continue
            for which, t in lowrank[canon].items():
                if (d := _factor_dim(shard, canon, which)) is not None:
                    lowrank[canon][which] = shard.cut(canon, t, name=sources[canon], dim=d)
    if awq_parts:  # AWQ: name each triplet like its float `.weight` would be named
        from ..quant.awq import awq_weights

        for base, w in awq_weights(awq_parts, qc).items():
            canon = hf_name(base + ".weight")
            if canon is not None:
                weights[canon], sources[canon] = w, sources.pop(base)
                continue
            lr = _LOWRANK.match(base + ".weight")  # an AWQ-quantized low-rank factor `<name>.0` / `<name>.1`
            canon = hf_name(lr.group(1) + ".weight") if lr else None
            if canon is None:
                raise WeightsError(f"unexpected AWQ-quantized tensor {base!r} for model_type {cfg.model_type}")
            lowrank.setdefault(canon, {})[lr.group(2)] = w
            lowrank_base[canon] = lr.group(1)
            sources.pop(base)
            sources[canon] = f"{lr.group(1)}.{{0,1}}.{{qweight,qzeros,scales}}"
    if lowrank:
        from ..quant.lowrank import LowRankWeight

        # config.json `ranks` (HF module name -> rank): the true ranks, when the stored factors are zero-padded
        # along the rank (`levante quantize --awq` pads it to a multiple of the group size)
        cfg_ranks = raw_cfg.get("ranks") if isinstance(raw_cfg.get("ranks"), dict) else {}
        for canon, pair in lowrank.items():
            if set(pair) != {"0", "1"}:
                raise WeightsError(f"{directory}: low-rank weight {sources[canon]} lacks its .0 or .1 factor")
            try:
                w = LowRankWeight(pair["0"], pair["1"])
            except ValueError as e:
                raise WeightsError(f"{directory}: low-rank weight {sources[canon]}: {e}") from None
            r = cfg_ranks.get(lowrank_base[canon])
            if isinstance(r, int) and 0 < r < w.rank:
                w.true_rank = r
            weights[canon] = w
    info = {"files": [p.name for p in shard_files(directory)], "file_dtypes": sorted(file_dtypes)}
    def release() -> None:
        for f in files:
            f.release()

    return Checkpoint(cfg, weights, "hf-safetensors", sources=sources, info=info, release=release)


def _factor_dim(shard: Shard, canon: str, which: str) -> int | None:
    """The dimension to cut factor `which` ("0": A [rank, in], "1": B [out, rank]) of low-rank weight `canon`
    along: a row split cuts B's rows, a column split A's columns."""
    d = shard.split(canon)
    return 1 if d == 1 and which == "0" else 0 if d == 0 and which == "1" else None


def _shard_awq(shard: Shard, parts: dict[str, dict[str, Tensor]], qc: dict) -> None:
    from ..quant.awq import check_awq_config

    group = check_awq_config(qc)
    for base in list(parts):
        canon, which = hf_name(base + ".weight"), None
        if canon is None and (lr := _LOWRANK.match(base + ".weight")):
            canon, which = hf_name(lr.group(1) + ".weight"), lr.group(2)
        if canon is None:
            continue  # reported as unexpected by the caller
        if not shard.holds(canon):
            del parts[base]
            continue
        d = shard.split(canon) if which is None else _factor_dim(shard, canon, which)
        if d is not None and all(k in parts[base] for k in ("qweight", "qzeros", "scales")):
            parts[base] = shard.cut_awq(canon, parts[base], group, name=base, dim=d)


def _split_fused(weights, sources, cfg: ModelConfig, layer: int, kind: str, t: Tensor, fname: str) -> None:
    """transformers-5 style fused experts: gate_up_proj [E, 2*ff, H], down_proj [E, H, ff]."""
    p = f"layers.{layer}.ffn.experts."
    for e in range(t.shape[0]):
        if kind == "gate_up_proj":
            ff = t.shape[1] // 2
            weights[f"{p}{e}.w1"], weights[f"{p}{e}.w3"] = t[e, :ff], t[e, ff:]
            sources[f"{p}{e}.w1"] = sources[f"{p}{e}.w3"] = f"{fname}:{kind}"
        else:
            weights[f"{p}{e}.w2"] = t[e]
            sources[f"{p}{e}.w2"] = f"{fname}:{kind}"

# ------------------------------------------------------------------------------------ writing
_HF_OUT_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj", "ffn.gate": "block_sparse_moe.gate",
    "ffn.w1": "mlp.gate_proj", "ffn.w2": "mlp.down_proj", "ffn.w3": "mlp.up_proj",
}
_HF_OUT_TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "added_tokens.json")


def hf_base_name(canon: str) -> str:
    """HF module name (no `.weight`) of a canonical tensor name: layers.0.ffn.experts.3.w1 ->
    model.layers.0.block_sparse_moe.experts.3.w1; layers.0.ffn.w1 -> model.layers.0.mlp.gate_proj."""
    if canon in _HF_OUT_TOP:
        return _HF_OUT_TOP[canon]
    m = re.match(r"^layers\.(\d+)\.(.+)$", canon)
    if not m:
        raise ValueError(f"no HF name for {canon!r}")
    layer, rest = m.groups()
    e = re.match(r"^ffn\.experts\.(\d+)\.(w[123])$", rest)
    if e:
        return f"model.layers.{layer}.block_sparse_moe.experts.{e.group(1)}.{e.group(2)}"
    return f"model.layers.{layer}.{_HF_OUT_LAYER[rest]}"


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers-style config.json dict for a levante ModelConfig."""
    d: dict[str, Any] = {
        "architectures": [{"mixtral": "MixtralForCausalLM", "mistral": "MistralForCausalLM"}.get(
            cfg.model_type, "LlamaForCausalLM")],
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
    }
    if cfg.pad_token_id is not None:
        d["pad_token_id"] = cfg.pad_token_id
    if cfg.rope_scaling:
        d["rope_scaling"] = cfg.rope_scaling
    if cfg.sliding_window:
        d["sliding_window"] = cfg.sliding_window
    if cfg.is_moe:
        d["num_local_experts"] = cfg.num_experts
        d["num_experts_per_tok"] = cfg.num_experts_per_tok
    return d


def natural_key(s: str) -> list:
    """Sort key that orders embedded numbers numerically (layers.2 before layers.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files of a HF directory; for a GGUF, convert its tokenizer with transformers."""
    notes = []
    if src.is_dir():
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, out_dir / f)
        return notes
    try:  # GGUF: transformers rebuilds tokenizer.json + tokenizer_config.json from the GGUF metadata
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(out_dir))
        notes.append(f"tokenizer converted from {src.name} with transformers")
    except Exception as e:  # noqa: BLE001 - any failure: the weights are still usable with the GGUF's tokenizer
        notes.append(f"no tokenizer written ({type(e).__name__}: {e}); use the tokenizer of {src.name}")
    return notes
