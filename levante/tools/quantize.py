"""`levante quantize IN OUT --type T`: write a llama.cpp-compatible GGUF file.

IN is a Hugging Face safetensors directory, a Mistral consolidated directory or a GGUF file (which
is dequantized and requantized). The output follows llama.cpp's converter conventions (architecture
`llama`, its tensor names, q/k rows in llama.cpp's interleaved rotary layout, merged expert
tensors) and llama.cpp's quantization mixes (`llama_tensor_get_type` in src/llama-quant.cpp), so a
Q4_K_M made here holds the same tensor types as one made by `llama-quantize`. The K quantizers are
numpy ports of llama.cpp's reference quantizers (`levante.quant.kquants`).

Low-rank checkpoints (`levante compress` output: config.json with `ranks`, tensors `<name>.0.weight` =
A [r, in] and `<name>.1.weight` = B [out, r]) keep their factors: each factored matrix becomes two GGUF
tensors, quantized like the matrix they replace (same llama.cpp type rules, by their `ffn_gate` /
`ffn_up` / `ffn_down` names):

    dense model:  blk.L.ffn_gate.lr_a.weight      [r', in]   blk.L.ffn_gate.lr_b.weight      [out, r']
    MoE model:    blk.L.ffn_gate.E.lr_a.weight    [r', in]   blk.L.ffn_gate.E.lr_b.weight    [out, r']

(same for ffn_up / ffn_down; E = expert). In a MoE layer where any expert of a kind is factored, that
kind is written per expert (`blk.L.ffn_gate.E.weight` for the experts that stayed dense) instead of the
stacked `ffn_gate_exps`. Metadata: `levante.low_rank` = true, `levante.low_rank.tensors` (the base
names, e.g. `blk.0.ffn_gate.3`), `levante.low_rank.ranks` (their ranks) and `levante.low_rank.rank_pad`.
Rank padding: for quantized types the rank is zero-padded to a multiple of 32 (r' = ceil(r / 32) * 32;
extra zero rows of A and zero columns of B change nothing, and zero blocks quantize exactly to zero),
so B's rows are whole 32-blocks. When r' is not a multiple of 256, a K-type chosen for B falls back
exactly as llama.cpp's `tensor_type_fallback` does for any row length (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0); A (rows of length `in`) keeps the K-type. Float types (F32 / F16 /
BF16) are written unpadded; `levante compress --rank-multiple 32` makes every rank a multiple of 32, so nothing
is padded. llama.cpp cannot load such files (it knows no factorised tensors);
`expand_low_rank=True` (`levante quantize --expand-low-rank`) writes B @ A as full matrices instead,
which llama.cpp loads but which saves nothing.

Tensors are streamed: the header is written first, then each tensor is converted to float32,
quantized and written, so peak memory is about one tensor. The file is written to a temporary
name next to OUT and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import tokenizer as tk
from ..config import ModelConfig
from ..formats import Checkpoint
from ..formats.gguf import open_gguf
from ..formats.mistral import half_to_interleaved
from ..loader import read_checkpoint
from ..quant.ggml import dequantize
from ..quant.kquants import BLOCK_SIZES, quantize
from ..quant.lowrank import LowRankWeight

# --------------------------------------------------------------------------------- file types

# name -> (llama.cpp LLAMA_FTYPE number, default tensor type)
FILE_TYPES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"),
    "F16": (1, "F16"),
    "Q4_0": (2, "Q4_0"),
    "Q4_1": (3, "Q4_1"),
    "Q8_0": (7, "Q8_0"),
    "Q5_0": (8, "Q5_0"),
    "Q5_1": (9, "Q5_1"),
    "Q2_K": (10, "Q2_K"),
    "Q3_K_S": (11, "Q3_K"),
    "Q3_K_M": (12, "Q3_K"),
    "Q3_K_L": (13, "Q3_K"),
    "Q4_K_S": (14, "Q4_K"),
    "Q4_K_M": (15, "Q4_K"),
    "Q5_K_S": (16, "Q5_K"),
    "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
    "BF16": (32, "BF16"),
}
FILE_TYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "FP16": "F16", "FP32": "F32"}
_FLOAT_TYPES = ("F32", "F16", "BF16")
# llama.cpp's tensor_type_fallback for rows that are not a whole number of blocks
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
LOW_RANK_PAD = 32  # rank padding of low-rank factors for quantized file types (see the module docstring)
_LR_NAME = re.compile(r"^blk\.\d+\.ffn_(?:gate|up|down)(?:\.\d+)?\.lr_[ab]\.weight$")


def is_low_rank_factor(name: str) -> bool:
    """True for the GGUF names of low-rank factors (`blk.L.ffn_gate[.E].lr_a.weight` / `.lr_b.weight`)."""
    return bool(_LR_NAME.match(name))


def normalize_file_type(qtype: str) -> str:
    t = qtype.upper().replace("-", "_")
    t = FILE_TYPE_ALIASES.get(t, t)
    if t not in FILE_TYPES:
        raise ValueError(f"unknown quantization type {qtype!r}; choose from {', '.join(FILE_TYPES)}")
    return t


def _block(t: str) -> int:
    return BLOCK_SIZES[t][0]


def _cmod(a: int, b: int) -> int:
    """C's % (the sign follows the dividend)."""
    return int(math.fmod(a, b))


def _layer_of(name: str) -> int:
    m = re.match(r"^blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _llama_order(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: by layer number (non-layer tensors first), then name."""
    return (_layer_of(name), name)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):  # fmt: skip
        if key in name:
            return cat
    return "other"


def _allows_quantization(name: str, ndim: int) -> bool:
    return ndim >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def tensor_types(
    tensors: dict[str, tuple[int, ...]], cfg: ModelConfig, file_type: str, warn: Callable[[str], None] | None = None
) -> dict[str, str]:
    """GGML type of every output tensor (numpy shapes) for a file type: llama_tensor_get_type's rules.

    Tensors that llama.cpp never quantizes (1-D, norms, the MoE router) are F32. For F32 / F16 / BF16
    the 2-D+ weights simply take that type. Counters (attn_v index, dense ffn_down index) run in
    llama.cpp's tensor order.
    """
    file_type = normalize_file_type(file_type)
    default = FILE_TYPES[file_type][1]
    n_expert = cfg.num_experts
    n_layer = cfg.num_layers
    n_gqa = cfg.num_heads // cfg.num_kv_heads
    is_70b = n_layer == 80 and cfg.num_heads != cfg.num_kv_heads
    tied = "output.weight" not in tensors
    names = sorted(tensors, key=_llama_order)
    cats = {n: _category(n) for n in names}
    n_attention_wv = sum(1 for n in names if cats[n] in ("attn_v", "attn_qkv", "attn_kv_b"))
    i_attention_wv = 0
    i_ffn_down = 0

    def more_bits(i: int, n: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or _cmod(i - n // 8, 3) == 2

    out: dict[str, str] = {}
    for name in names:
        shape = tensors[name]
        if not _allows_quantization(name, len(shape)):
            out[name] = "F32"
            continue
        if default in _FLOAT_TYPES:
            out[name] = default
            continue
        cat = cats[name]
        ft = file_type
        t = default
        if cat == "output" or (tied and cat == "token_embd"):
            if shape[-1] % _block(t):
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        elif cat == "token_embd":
            pass
        elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if ft == "Q2_K":
                t = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif ft == "Q3_K_M":
                t = "Q5_K" if i_attention_wv < 2 else "Q4_K"
            elif ft == "Q3_K_L":
                t = "Q5_K"
            elif ft in ("Q4_K_M", "Q5_K_M") and more_bits(i_attention_wv, n_attention_wv):
                t = "Q6_K"
            elif ft == "Q4_K_S" and i_attention_wv < 4:
                t = "Q5_K"
            if is_70b and t in ("Q3_K", "Q4_K"):
                t = "Q5_K"
            if n_expert == 8:
                t = "Q8_0"
            i_attention_wv += 1
        elif cat == "attn_k":
            if n_expert == 8:
                t = "Q8_0"
        elif cat == "ffn_down":
            lowrank = is_low_rank_factor(name)  # A and B of one matrix: one ffn_down of the layer
            i_layer = _layer_of(name) if n_expert > 1 or lowrank else i_ffn_down
            if ft == "Q2_K":
                t = "Q3_K"
            elif ft == "Q3_K_M":
                t = "Q5_K" if i_layer < n_layer // 16 else "Q4_K"
            elif ft == "Q3_K_L":
                t = "Q5_K"
            elif ft == "Q4_K_M":
                if more_bits(i_layer, n_layer):
                    t = "Q6_K"
            elif ft == "Q5_K_M" and more_bits(i_layer, n_layer):
                t = "Q6_K"
            elif ft == "Q4_K_S" and i_layer < n_layer // 8:
                t = "Q5_K"
            if not lowrank or ".lr_a." in name:
                i_ffn_down += 1
        elif cat == "attn_output":
            if n_expert == 8:
                if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    t = "Q5_K"
            elif ft == "Q2_K":
                t = "Q3_K"
            elif ft == "Q3_K_M":
                t = "Q4_K"
            elif ft == "Q3_K_L":
                t = "Q5_K"
        # tensor_type_fallback
        if shape[-1] % _block(t):
            new = _FALLBACK.get(t, "F16")  # llama.cpp aborts for the 32-block types; F16 is the safe choice
            if shape[-1] % _block(new):
                new = "F16"
            if warn and not is_low_rank_factor(name):  # rank-length rows: the documented rule, no warning
                warn(f"{name}: row length {shape[-1]} is not a multiple of {_block(t)} ({t}); using {new}")
            t = new
        out[name] = t
    return out


# --------------------------------------------------------------------------------- tensor plan

_EXPERT_W = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
_DENSE = {"attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv", "attn_output": "attn.wo",
          "ffn_gate": "ffn.w1", "ffn_down": "ffn.w2", "ffn_up": "ffn.w3",
          "attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "ffn_gate_inp": "ffn.gate"}  # fmt: skip


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]  # numpy order
    load: Callable[[], np.ndarray]  # float32 array of `shape`


def _to_f32(w: Any) -> np.ndarray:
    if isinstance(w, torch.Tensor):
        return w.detach().to(torch.float32).contiguous().numpy()
    return w.dequantize(torch.float32).contiguous().numpy()


def _shape(w: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in w.shape)


def _pad_rank(f: np.ndarray, r_pad: int, axis: int) -> np.ndarray:
    """Zero-pad factor `f` along `axis` (0: rows of A, 1: columns of B) to r_pad."""
    r = f.shape[axis]
    if r == r_pad:
        return np.ascontiguousarray(f)
    width = [(0, 0), (0, 0)]
    width[axis] = (0, r_pad - r)
    return np.pad(f, width)


@dataclass
class LowRankInfo:
    """The factored matrices written to a GGUF: base name (`blk.L.ffn_gate[.E]`) -> (rank, padded rank)."""

    ranks: dict[str, tuple[int, int]]
    pad: int


def _plan(ckpt: Checkpoint, extra: dict[str, np.ndarray], expand_low_rank: bool = False,
          rank_pad: int = 1) -> tuple[list[_Planned], LowRankInfo]:
    cfg = ckpt.config
    W = ckpt.weights
    plan: list[_Planned] = []
    lr = LowRankInfo({}, rank_pad)

    def factored(w: Any) -> bool:
        return isinstance(w, LowRankWeight) and not expand_low_rank

    def add_w(name: str, w: Any, post: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        # name = "<base>.weight" -> "<base>.lr_a.weight" / "<base>.lr_b.weight"; only MLP / expert matrices
        # (what `levante compress` factors); any other low-rank weight is written expanded
        if factored(w) and is_low_rank_factor(name.removesuffix(".weight") + ".lr_a.weight"):
            base = name.removesuffix(".weight")
            r = w.true_rank  # factors read from a padded GGUF: beyond true_rank they are zeros
            r_pad = -(-r // rank_pad) * rank_pad
            lr.ranks[base] = (r, r_pad)
            plan.append(_Planned(base + ".lr_a.weight", (r_pad, w.in_features),
                                 lambda: _pad_rank(_to_f32(w.a)[:r], r_pad, 0)))
            plan.append(_Planned(base + ".lr_b.weight", (w.out_features, r_pad),
                                 lambda: _pad_rank(_to_f32(w.b)[:, :r], r_pad, 1)))
            return

        def load() -> np.ndarray:
            a = _to_f32(w)  # a LowRankWeight with expand_low_rank: B @ A, the full matrix
            return post(a) if post else a

        plan.append(_Planned(name, _shape(w), load))

    def add(name: str, canon: str, post: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        add_w(name, W[canon], post)

    add("token_embd.weight", "embed")
    for name, arr in extra.items():
        plan.append(_Planned(name, tuple(arr.shape), lambda a=arr: a))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        b = f"blk.{i}."
        add(b + "attn_norm.weight", p + "attn_norm")
        add(b + "attn_q.weight", p + "attn.wq", lambda a: half_to_interleaved(a, cfg.num_heads))
        add(b + "attn_k.weight", p + "attn.wk", lambda a: half_to_interleaved(a, cfg.num_kv_heads))
        add(b + "attn_v.weight", p + "attn.wv")
        add(b + "attn_output.weight", p + "attn.wo")
        add(b + "ffn_norm.weight", p + "ffn_norm")
        if cfg.is_moe:
            add(b + "ffn_gate_inp.weight", p + "ffn.gate")
            for kind, wname in _EXPERT_W.items():
                ws = [W[f"{p}ffn.experts.{e}.{wname}"] for e in range(cfg.num_experts)]
                if any(factored(w) for w in ws):  # per-expert tensors, factors for the factored experts
                    single = kind.removesuffix("_exps")
                    for e, w in enumerate(ws):
                        add_w(f"{b}{single}.{e}.weight", w)
                    continue

                def load(ws: list = ws) -> np.ndarray:
                    first = _to_f32(ws[0])
                    out = np.empty((len(ws), *first.shape), np.float32)
                    out[0] = first
                    for e in range(1, len(ws)):
                        out[e] = _to_f32(ws[e])
                    return out

                plan.append(_Planned(b + kind + ".weight", (len(ws), *_shape(ws[0])), load))
        else:
            add(b + "ffn_gate.weight", p + "ffn.w1")
            add(b + "ffn_down.weight", p + "ffn.w2")
            add(b + "ffn_up.weight", p + "ffn.w3")
    add("output_norm.weight", "norm")
    if "lm_head" in W and not cfg.tie_word_embeddings:
        add("output.weight", "lm_head")
    return plan, lr


def _low_rank_kv(lr: LowRankInfo) -> list[_KV]:
    if not lr.ranks:
        return []
    names = sorted(lr.ranks, key=_llama_order)
    return [
        ("levante.low_rank", True, "BOOL", None),
        ("levante.low_rank.rank_pad", lr.pad, "UINT32", None),
        ("levante.low_rank.tensors", names, "ARRAY", "STRING"),
        ("levante.low_rank.ranks", [lr.ranks[n][0] for n in names], "ARRAY", "UINT32"),
    ]


# ----------------------------------------------------------------------------------- metadata

# (key, value, GGUFValueType name, array sub-type name or None)
_KV = tuple[str, Any, str, "str | None"]


def _llama3_rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """convert_hf_to_gguf's rope_freqs.weight for llama3 rope scaling."""
    sc = cfg.rope_scaling or {}
    factor = float(sc.get("factor", 8.0))
    low = float(sc.get("low_freq_factor", 1.0))
    high = float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    dim = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    factors = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            factors.append(1.0)
        elif wl > low_wl:
            factors.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _hparam_kv(cfg: ModelConfig, name: str, file_type: int) -> list[_KV]:
    a = "llama."
    kv: list[_KV] = [
        ("general.architecture", "llama", "STRING", None),
        ("general.type", "model", "STRING", None),
        ("general.name", name, "STRING", None),
        (a + "block_count", cfg.num_layers, "UINT32", None),
        (a + "context_length", cfg.max_position_embeddings, "UINT32", None),
        (a + "embedding_length", cfg.hidden_size, "UINT32", None),
        (a + "feed_forward_length", cfg.intermediate_size, "UINT32", None),
        (a + "attention.head_count", cfg.num_heads, "UINT32", None),
        (a + "attention.head_count_kv", cfg.num_kv_heads, "UINT32", None),
        (a + "rope.freq_base", float(cfg.rope_theta), "FLOAT32", None),
        (a + "attention.layer_norm_rms_epsilon", float(cfg.rms_norm_eps), "FLOAT32", None),
    ]
    if cfg.is_moe:
        kv += [(a + "expert_count", cfg.num_experts, "UINT32", None),
               (a + "expert_used_count", cfg.num_experts_per_tok, "UINT32", None)]  # fmt: skip
    kv += [
        (a + "attention.key_length", cfg.head_dim, "UINT32", None),
        (a + "attention.value_length", cfg.head_dim, "UINT32", None),
        ("general.file_type", file_type, "UINT32", None),
        (a + "vocab_size", cfg.vocab_size, "UINT32", None),
        (a + "rope.dimension_count", cfg.head_dim, "UINT32", None),
    ]
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) == "linear":
        kv += [(a + "rope.scaling.type", "linear", "STRING", None),
               (a + "rope.scaling.factor", float(sc["factor"]), "FLOAT32", None)]  # fmt: skip
    kv.append(("general.quantization_version", 2, "UINT32", None))
    return kv


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or tok in ("<s>", "</s>", "<unk>", "<pad>", "<mask>")


def _tokenizer_kv(directory: Path, vocab_size: int) -> tuple[list[_KV], Any]:
    """tokenizer.ggml.* keys as convert_hf_to_gguf writes them; returns (kvs, gguf.SpecialVocab)."""
    import gguf

    spm = directory / "tokenizer.model"
    tjson = directory / "tokenizer.json"
    if spm.is_file():
        model = tk.parse_sentencepiece_model(spm.read_bytes())
        n = max(vocab_size, len(model["pieces"]))
        tokens = [f"[PAD{i}]" for i in range(n)]
        scores = [-1000.0] * n
        types = [tk.UNUSED] * n
        for i, (p, s, t) in enumerate(zip(model["pieces"], model["scores"], model["types"])):
            tokens[i], scores[i], types[i] = p, float(s), int(t)
        added = directory / "added_tokens.json"
        if added.is_file():
            for tok, i in json.loads(added.read_text(encoding="utf-8")).items():
                if 0 <= int(i) < n:
                    tokens[int(i)], scores[int(i)], types[int(i)] = tok, -1000.0, tk.USER_DEFINED
        cfg_file = directory / "tokenizer_config.json"
        if cfg_file.is_file():
            decoder = json.loads(cfg_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            for sid, data in decoder.items():
                i, tok = int(sid), data["content"]
                if i >= n:
                    continue
                if data.get("special") or _looks_special(tok):
                    types[i] = tk.CONTROL
                else:
                    tok = tok.replace(tk.SPACE, " ")
                    types[i] = tk.USER_DEFINED
                scores[i] = -1000.0
                tokens[i] = tok
        kv: list[_KV] = [
            ("tokenizer.ggml.model", "llama", "STRING", None),
            ("tokenizer.ggml.pre", "default", "STRING", None),
            ("tokenizer.ggml.tokens", tokens, "ARRAY", "STRING"),
            ("tokenizer.ggml.scores", scores, "ARRAY", "FLOAT32"),
            ("tokenizer.ggml.token_type", types, "ARRAY", "INT32"),
        ]
        return kv, gguf.SpecialVocab(directory, load_merges=False, n_vocab=len(tokens))
    if tjson.is_file():
        data = json.loads(tjson.read_text(encoding="utf-8"))
        tok = tk.tokenizer_from_json(data)
        n = max(vocab_size, tok.vocab_size)
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [tk.UNUSED] * n
        for i, (p, t) in enumerate(zip(tok.pieces, tok.token_types)):
            tokens[i], types[i] = p, int(t)
        added_special = {int(a["id"]): bool(a.get("special")) for a in data.get("added_tokens") or []}
        for i, special in added_special.items():
            if i < n:
                types[i] = tk.CONTROL if special else tk.USER_DEFINED
        if isinstance(tok, tk.SentencePieceTokenizer):
            # llama.cpp's SPM tokenizer merges by score: rank the pieces by id (the SentencePiece order)
            scores = [-float(i) if types[i] == tk.NORMAL else 0.0 for i in range(n)]
            kv = [
                ("tokenizer.ggml.model", "llama", "STRING", None),
                ("tokenizer.ggml.pre", "default", "STRING", None),
                ("tokenizer.ggml.tokens", tokens, "ARRAY", "STRING"),
                ("tokenizer.ggml.scores", scores, "ARRAY", "FLOAT32"),
                ("tokenizer.ggml.token_type", types, "ARRAY", "INT32"),
            ]
            return kv, gguf.SpecialVocab(directory, load_merges=False, n_vocab=n)
        pats = [p.pattern for p in tok._pre]
        pre = "gpt2"
        for pname, ppats in tk.PRE_TOKENIZERS.items():
            if pname not in ("default", "gpt2") and ppats == pats:
                pre = pname
                break
        if pre == "llama3":
            pre = "llama-bpe"
        kv = [
            ("tokenizer.ggml.model", "gpt2", "STRING", None),
            ("tokenizer.ggml.pre", pre, "STRING", None),
            ("tokenizer.ggml.tokens", tokens, "ARRAY", "STRING"),
            ("tokenizer.ggml.token_type", types, "ARRAY", "INT32"),
        ]
        return kv, gguf.SpecialVocab(directory, load_merges=True, n_vocab=n)
    return [], None


def _gguf_source_kv(path: Path) -> tuple[list[_KV], dict[str, np.ndarray]]:
    """All metadata of a GGUF file with its value types, plus its rope_freqs tensor if any (levante's reader)."""
    reader = open_gguf(path)
    kv: list[_KV] = [(key, value, *reader.field_types[key][:1], (reader.field_types[key][1:] or (None,))[0])
                     for key, value in reader.fields.items()]
    extra = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raw = torch.from_numpy(np.ascontiguousarray(t.data).reshape(1, -1))
            extra[t.name] = dequantize(raw, t.qtype).numpy().reshape(-1).astype(np.float32)
    return kv, extra


_DROP_FROM_SOURCE = ("general.file_type", "general.quantization_version", "general.alignment", "split.",
                     "levante.low_rank")  # re-written from the tensors actually written


def _metadata(src: Path, ckpt: Checkpoint, file_type: int) -> tuple[list[_KV], Any, dict[str, np.ndarray]]:
    cfg = ckpt.config
    extra: dict[str, np.ndarray] = {}
    if src.is_file():
        source_kv, extra = _gguf_source_kv(src)
        base = _hparam_kv(cfg, src.stem, file_type)
        merged: dict[str, _KV] = {k[0]: k for k in base}
        for k in source_kv:
            if k[0].startswith(_DROP_FROM_SOURCE):
                continue
            merged[k[0]] = k
        return list(merged.values()), None, extra
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) == "llama3":
        extra["rope_freqs.weight"] = _llama3_rope_freqs(cfg)
    kv = _hparam_kv(cfg, src.name, file_type)
    tok_kv, special = _tokenizer_kv(src, cfg.vocab_size)
    return kv + tok_kv, special, extra


# ------------------------------------------------------------------------------------- writer


def _iter_progress(items: list, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit="tensor")


def quantize_model(src: str | Path, dst: str | Path, qtype: str, force: bool = False, progress: bool = True,
                   expand_low_rank: bool = False) -> Path:
    """Convert / quantize the model at `src` into a GGUF file `dst` of llama.cpp file type `qtype`.

    `qtype`: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S,
    Q4_K_M, Q5_K_S, Q5_K_M or Q6_K. Refuses to overwrite `dst` unless `force`. Low-rank weights are
    written as quantized factor pairs (levante-only files, see the module docstring) unless
    `expand_low_rank`, which writes B @ A as full matrices that llama.cpp can load.
    """
    import gguf

    src, dst = Path(src), Path(dst)
    file_type = normalize_file_type(qtype)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    if dst.exists() and dst.is_dir():
        raise IsADirectoryError(f"{dst} is a directory; give the output file name")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{src}: input and output are the same file")
    ckpt = read_checkpoint(src)
    ftype_num = FILE_TYPES[file_type][0]
    kv, special, extra = _metadata(src, ckpt, ftype_num)
    rank_pad = 1 if FILE_TYPES[file_type][1] in _FLOAT_TYPES else LOW_RANK_PAD
    plan, lr = _plan(ckpt, extra, expand_low_rank, rank_pad)
    kv = kv + _low_rank_kv(lr)
    warnings: list[str] = []
    types = tensor_types({p.name: p.shape for p in plan}, ckpt.config, file_type, warn=warnings.append)
    for w in warnings:
        print(f"warning: {w}")
    if lr.ranks and progress:
        padded = sum(1 for r, rp in lr.ranks.values() if rp != r)
        fb = Counter(types[n] for n in types if n.endswith(".lr_b.weight"))
        print(f"low-rank: {len(lr.ranks)} factored matrices written as A/B factor pairs ({padded} ranks zero-padded "
              f"to a multiple of {rank_pad}; B factor types {dict(fb)}). llama.cpp cannot load this file; "
              "use --expand-low-rank for a llama.cpp-compatible one.")

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.kv_data[0].pop("general.architecture", None)  # re-added below, in our order
        for key, value, vtype, sub in kv:
            writer.add_key_value(
                key, value, gguf.GGUFValueType[vtype], sub_type=gguf.GGUFValueType[sub] if sub else None
            )
        if special is not None:
            special.add_to_gguf(writer, quiet=True)
        for p in plan:
            t = types[p.name]
            bs, ts = BLOCK_SIZES[t]
            nbytes = int(np.prod(p.shape[:-1], dtype=np.int64)) * (p.shape[-1] // bs) * ts
            byte_shape = (*p.shape[:-1], p.shape[-1] // bs * ts)
            writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), nbytes, gguf.GGMLQuantizationType[t])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in _iter_progress(plan, progress, f"quantizing to {file_type}"):
            data = quantize(p.load(), types[p.name])
            writer.write_tensor_data(data)
            del data
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the output normal file permissions
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
