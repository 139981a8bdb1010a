"""GGUF reader (llama.cpp's file format), architecture `llama` (Llama, Mistral, Mixtral).

The file is memory-mapped (copy-on-write, so nothing is ever written back); quantized tensors
become `GGMLWeight`s whose packed bytes are zero-copy views of the mapping. Only small tensors are
copied: norms and the MoE router (dequantized to float32) and wq / wk, whose rows are put back
from llama.cpp's interleaved rotary layout into the rotate-half layout (a permutation of whole
rows, so quantized blocks are moved, never re-rounded).

Low-rank GGUFs written by `levante quantize` (metadata `levante.low_rank`; tensors
`blk.L.ffn_gate[.E].lr_a.weight` = A [r, in] and `.lr_b.weight` = B [out, r], see levante/tools/quantize.py)
become `LowRankWeight`s whose two factors are the same quantized weights as any other tensor, so
both matmuls run on the packed factors and B @ A is never formed.
"""

from __future__ import annotations

import codecs
import math
import mmap
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig, expected_shapes
from ..errors import ConfigError, LevanteError, UnsupportedQuantError, WeightsError
from ..quant.base import QuantWeight
from ..quant.ggml import FLOAT_TYPES, GGMLWeight, check_qtype, dequantize
from ..quant.ggml import GGML_TYPES as GGML_BLOCKS
from ..quant.kernels import QTYPES as KERNEL_TYPES
from ..quant.kernels import GGMLKernelWeight, Grouped16Weight, fast_weight
from ..rope import base_inv_freq, llama3_inv_freq
from ..shard import Shard, trim_heap
from . import Checkpoint

SUPPORTED_VERSIONS = (2, 3)
_ARRAY = 9  # GGUFValueType.ARRAY


# ------------------------------------------------------------------------------------ the reader
# GGML tensor types: id -> (name, elements per block, bytes per block) (ggml.h / gguf.constants)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
# metadata value types: id -> name (gguf.GGUFValueType's), and the numpy scalar type of each scalar
VALUE_TYPES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
               8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}


class GGUFTensor:
    """One tensor of a GGUF file: name, GGML type, dims (GGUF order: row length first) and its bytes
    as a uint8 [..., bytes per row] view of the mapping."""

    __slots__ = ("name", "qtype", "dims", "data")

    def __init__(self, name: str, qtype: str, dims: tuple[int, ...], data: np.ndarray) -> None:
        self.name, self.qtype, self.dims, self.data = name, qtype, dims, data

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / torch order (row length last)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)


class GGUFFile:
    """A GGUF file (v2 / v3, little-endian), memory-mapped: `fields` are the metadata as plain Python
    values (arrays as lists), `field_types` their GGUF value types as names of VALUE_TYPES (("ARRAY", item
    type) for arrays: what a writer needs to copy them), `tensors` the tensor table. Reading it needs no
    `gguf` package (whose import pulls in ~30 MB of modules); every malformed part raises ValueError /
    WeightsError. levante's one GGUF reader: models, `levante info` and `levante quantize`'s sources."""

    def __init__(self, path: Path) -> None:
        self.data = np.memmap(path, dtype=np.uint8, mode="c")
        self._mv = memoryview(self.data)
        self._pos = 0
        magic, self.version, n_tensors, n_kv = self._unpack("<4sIQQ")
        assert magic == b"GGUF"  # checked by open_gguf
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, tuple[str, ...]] = {}
        for _ in range(n_kv):
            key = self._string()
            (vt,) = self._unpack("<I")
            start = self._pos
            self.fields[key] = self._value(vt)  # checks vt, and that an array's header is in the file
            if vt == _ARRAY:
                sub = struct.unpack_from("<I", self._mv, start)[0]
                self.field_types[key] = ("ARRAY", VALUE_TYPES[sub])
            else:
                self.field_types[key] = (VALUE_TYPES[vt],)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (nd,) = self._unpack("<I")
            if nd > 8:
                raise ValueError(f"tensor {name}: {nd} dimensions")
            dims = self._unpack(f"<{nd}Q")
            tid, off = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in dims), tid, off))
        self.alignment = int(self.fields.get("general.alignment", 32))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"general.alignment {self.alignment} is not a power of two")
        start = -(-self._pos // self.alignment) * self.alignment
        self.tensors: list[GGUFTensor] = []
        seen = set()
        size = len(self.data)
        for name, dims, tid, off in infos:
            if name in seen:
                raise WeightsError(f"duplicate tensor name {name}")
            seen.add(name)
            if tid not in GGML_TYPES:
                raise UnsupportedQuantError(f"tensor {name}: unknown GGML type id {tid}")
            qtype, bs, ts = GGML_TYPES[tid]
            if dims and dims[0] % bs:
                raise WeightsError(
                    f"tensor {name}: row length {dims[0]} is not a multiple of the {qtype} block size {bs}"
                )
            begin = start + off
            end = begin + math.prod(dims) * ts // bs
            if end > size:
                raise WeightsError(
                    f"truncated file: tensor {name} ({qtype}, {list(dims)}) needs bytes "
                    f"{begin}..{end} but the file has only {size} bytes"
                )
            row = dims[0] * ts // bs if dims else ts
            shape = tuple(reversed(dims[1:])) + (row,)
            self.tensors.append(GGUFTensor(name, qtype, dims, self.data[begin:end].reshape(shape)))

    def release(self, t: GGUFTensor) -> None:
        """Drop the mapped pages of a tensor whose bytes were copied elsewhere (e.g. regrouped at load), so
        they stop counting in the process's memory; a later read of them faults them back in from the file
        (the mapping is private and never written)."""
        mm = getattr(self.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.data.ctypes.data - self.data.ctypes.data
        page = mmap.PAGESIZE
        a, b = -(-start // page) * page, (start + t.data.nbytes) // page * page
        if b > a:
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def _unpack(self, fmt: str) -> tuple:
        st = struct.Struct(fmt)
        if self._pos + st.size > len(self._mv):
            raise ValueError(f"header cut off at byte {self._pos}")
        out = st.unpack_from(self._mv, self._pos)
        self._pos += st.size
        return out

    def _array(self, dt: np.dtype, n: int) -> np.ndarray:
        if self._pos + n * dt.itemsize > len(self._mv):
            raise ValueError(f"metadata at byte {self._pos} runs past the end of the file")
        arr = np.frombuffer(self._mv, dt, n, self._pos)
        self._pos += n * dt.itemsize
        return arr

    def _strings(self, n: int) -> list[str]:
        """n GGUF strings (u64 length + utf-8 bytes; invalid utf-8 replaced)."""
        mv, size, p = self._mv, len(self._mv), self._pos
        unpack = struct.Struct("<Q").unpack_from
        dec = codecs.utf_8_decode
        out = []
        for _ in range(n):
            if p + 8 > size:
                raise ValueError(f"string at byte {p} runs past the end of the file")
            (ln,) = unpack(mv, p)
            p += 8
            if p + ln > size:
                raise ValueError(f"string at byte {p} runs past the end of the file")
            out.append(dec(mv[p : p + ln], "replace", True)[0])
            p += ln
        self._pos = p
        return out

    def _string(self) -> str:
        return self._strings(1)[0]

    def _value(self, vt: int) -> Any:
        if vt == 8:
            return self._string()
        if vt in _SCALARS:
            v = self._array(np.dtype(_SCALARS[vt]), 1)[0].item()
            return bool(v) if vt == 7 else v
        if vt == 9:
            sub, n = self._unpack("<IQ")
            if sub == 8:
                return self._strings(n)
            if sub in _SCALARS:
                arr = self._array(np.dtype(_SCALARS[sub]), n)
                return [bool(v) for v in arr] if sub == 7 else arr.tolist()
            return [self._value(sub) for _ in range(n)]  # nested arrays (rare)
        raise ValueError(f"unknown metadata value type {vt} at byte {self._pos}")


def open_gguf(path: Path) -> Any:
    """Open a GGUF file, turning every failure into a WeightsError that names the problem."""
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if not path.is_file():
        raise WeightsError(f"{path}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:4] != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    if len(head) < 24:
        raise WeightsError(f"{path}: truncated file: header cut off ({size} bytes)")
    version = struct.unpack_from("<I", head, 4)[0]
    if version & 0xFFFF == 0 and version:
        raise WeightsError(f"{path}: big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise WeightsError(
            f"{path}: unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    try:
        return GGUFFile(path)
    except LevanteError as e:
        raise type(e)(f"{path}: {e}") from None
    except Exception as e:  # ValueError / struct.error / UnicodeError on bad data
        raise WeightsError(f"{path}: truncated or corrupt GGUF header: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------- the config
def _config(fields: dict[str, Any], path: Path, tensors: dict[str, Any]) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch is None:
        raise ConfigError(f"{path}: missing required key 'general.architecture'")
    if arch != "llama":
        raise ConfigError(f"{path}: unsupported architecture {arch!r} (levante reads GGUF architecture 'llama')")

    def key(k: str, default: Any = ...) -> Any:
        full = f"llama.{k}"
        if full in fields:
            return fields[full]
        if default is ...:
            raise ConfigError(f"{path}: missing required key {full!r}")
        return default

    n_layers = int(key("block_count"))
    hidden = int(key("embedding_length"))
    ff = int(key("feed_forward_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = int(key("attention.head_count_kv", n_heads))
    if n_heads <= 0 or n_kv <= 0:
        raise ConfigError(f"{path}: attention.head_count {n_heads} / head_count_kv {n_kv} must be positive")
    head_dim = int(key("attention.key_length", 0) or 0)
    if not head_dim:
        if hidden % n_heads:
            raise ConfigError(f"{path}: embedding_length {hidden} is not divisible by head_count {n_heads}")
        head_dim = hidden // n_heads
    v_len = key("attention.value_length", None)
    if v_len is not None and int(v_len) != head_dim:
        raise ConfigError(f"{path}: attention.value_length {v_len} != key_length {head_dim} is not supported")
    rope_dims = key("rope.dimension_count", None)
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ConfigError(
            f"{path}: llama.rope.dimension_count {rope_dims} != head_dim {head_dim} (partial rotary is not supported)"
        )
    n_exp = int(key("expert_count", 0) or 0)
    n_used = int(key("expert_used_count")) if n_exp else 2
    if "llama.vocab_size" in fields:
        vocab = int(fields["llama.vocab_size"])
    elif "tokenizer.ggml.tokens" in fields:
        vocab = len(fields["tokenizer.ggml.tokens"])
    elif "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].dims[1])
    else:
        raise ConfigError(f"{path}: missing required key 'llama.vocab_size' (and no tokenizer.ggml.tokens)")
    scaling = None
    stype = key("rope.scaling.type", None)
    if stype not in (None, "none"):
        if stype != "linear":
            raise ConfigError(f"{path}: rope scaling type {stype!r} is not supported")
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}

    def tok_id(k: str) -> int | None:
        v = fields.get(f"tokenizer.ggml.{k}")
        return None if v is None else int(v)

    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=ff,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(key("context_length")),
            num_experts=n_exp,
            num_experts_per_tok=n_used,
            tie_word_embeddings="output.weight" not in tensors,
            model_type="mixtral" if n_exp > 0 else "llama",
            bos_token_id=tok_id("bos_token_id"),
            eos_token_id=tok_id("eos_token_id"),
            pad_token_id=tok_id("padding_token_id"),
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _llama3_scaling(factors: np.ndarray, cfg: ModelConfig, fields: dict[str, Any], path: Path) -> dict:
    """Recover llama3 rope-scaling parameters from a `rope_freqs` tensor (checked, else ConfigError)."""
    base = base_inv_freq(cfg.head_dim, cfg.rope_theta)
    f = torch.from_numpy(np.asarray(factors, dtype=np.float32).reshape(-1).copy())
    if f.numel() != base.numel():
        raise ConfigError(f"{path}: rope_freqs has {f.numel()} entries, expected {base.numel()}")
    orig = int(fields.get("llama.rope.scaling.original_context_length", 8192) or 8192)
    sc = {
        "rope_type": "llama3",
        "factor": float(f.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": orig,
    }
    got = base / llama3_inv_freq(base, sc)
    if not torch.allclose(got, f, rtol=1e-3, atol=1e-4):
        raise ConfigError(f"{path}: rope_freqs tensor does not match llama3 rope scaling; not supported")
    return sc


# ---------------------------------------------------------------------------------- the tensors
_LAYER = re.compile(r"^blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.weight$")
_LOW_RANK = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)(?:\.(\d+))?\.lr_([ab])\.weight$")
_TOP = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "attn.wq",
    "attn_k": "attn.wk",
    "attn_v": "attn.wv",
    "attn_output": "attn.wo",
    "ffn_gate": "ffn.w1",
    "ffn_up": "ffn.w3",
    "ffn_down": "ffn.w2",
    "ffn_gate_inp": "ffn.gate",
}
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
_FLOAT_NP = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _raw(rt: GGUFTensor) -> Tensor:
    """The tensor's bytes as uint8 [..., bytes_per_row] (zero-copy view of the mapping)."""
    return torch.from_numpy(rt.data)


def _qk_perm(n_head: int, head_dim: int) -> Tensor:
    """Row order that undoes llama.cpp's interleaving permutation of wq / wk."""
    return torch.arange(n_head * head_dim).reshape(n_head, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, shard: Shard | None = None,
              regroup: bool = True) -> Checkpoint:
    """Read a GGUF file into a Checkpoint (quantized weights stay packed, memory-mapped). `shard`: keep only this
    rank's slices of the split weights (copied out of the mapping, whose pages are then given back). `regroup`:
    Q4_0 / Q4_K / Q6_K weights in the CPU kernels' 16-row groups (new memory); False keeps every weight a view of
    the mapping (for a GPU, which re-lays them one at a time as it moves them)."""
    path = Path(path)
    reader = open_gguf(path)
    fields = reader.fields
    tensors = {t.name: t for t in reader.tensors}
    try:
        cfg = _config(fields, path, tensors)
    except LevanteError:
        raise
    except (TypeError, ValueError, KeyError) as e:  # a key of the wrong type, e.g. a string block_count
        raise ConfigError(f"{path}: bad llama.* metadata: {type(e).__name__}: {e}") from e
    if "rope_freqs.weight" in tensors:
        rf = tensors["rope_freqs.weight"]
        cfg.rope_scaling = _llama3_scaling(
            dequantize(_raw(rf).reshape(1, -1), rf.qtype).numpy(), cfg, fields, path
        )
    shapes = expected_shapes(cfg)
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head")
    fname = path.name
    shard = shard.for_config(cfg) if shard is not None else None

    weights: dict[str, Tensor | QuantWeight] = {}
    sources: dict[str, str] = {}

    def check(rt: Any, qtype: str, want: tuple[int, ...], what: str) -> None:
        check_qtype(qtype, rt.name)
        got = rt.shape
        if got != want:
            raise WeightsError(
                f"{path}: tensor {rt.name} has shape {got}, expected {want} for {what} (from the llama.* metadata)"
            )

    def put(canon: str, w: Tensor | QuantWeight, rt: Any) -> None:
        if canon in weights:
            raise WeightsError(f"{path}: tensor {rt.name} duplicates {sources[canon]} ({canon})")
        weights[canon] = w
        sources[canon] = f"{fname}:{rt.name}"
        regrouped[rt.name] = regrouped.get(rt.name, True) and isinstance(w, Grouped16Weight)

    # A tensor whose weights were all regrouped into new memory (Grouped16Weight) gives its mapped pages back as
    # soon as it is done, so the file and the regrouped copy are never both resident.
    regrouped: dict[str, bool] = {}

    def release_if_regrouped(rt: GGUFTensor | None) -> None:
        if rt is not None and (regrouped.get(rt.name) or rt.name in copied):
            reader.release(rt)
            if rt.name in copied:
                trim_heap()

    copied: set[str] = set()  # tensors this rank took a slice of

    def cut(canon: str, raw: Tensor, qtype: str, shape: tuple[int, int], rt: Any, name: str,
            dim: int | None = None) -> tuple[Tensor, tuple[int, int]]:
        """This rank's slice of a tensor's raw rows and its shape (the whole tensor without a shard)."""
        if shard is None or (d := shard.split(canon) if dim is None else dim) is None:
            return raw, shape
        bs, ts, _ = GGML_BLOCKS[qtype]
        raw = shard.cut(canon, raw.reshape(shape[0], -1), bs, ts, name=f"{fname}:{name}", dim=d)
        copied.add(rt.name)
        n = shard.bounds(shape[d])
        return raw, ((n[1] - n[0], shape[1]) if d == 0 else (shape[0], n[1] - n[0]))

    def linear(raw: Tensor, qtype: str, shape: tuple[int, int], name: str) -> Tensor | QuantWeight:
        if qtype in FLOAT_TYPES and _FLOAT_NP[qtype] == dtype:
            return raw.view(dtype).reshape(shape)  # zero-copy plain tensor in the compute dtype
        if qtype in KERNEL_TYPES:  # fused C++ kernel (torch fallback), exact GGML arithmetic
            if not regroup:
                return GGMLKernelWeight(raw.reshape(shape[0], -1), qtype, shape[0], shape[1])
            return fast_weight(raw.reshape(shape[0], -1), qtype, shape[0], shape[1])
        return GGMLWeight(raw.reshape(shape[0], -1), qtype, shape, name)

    def small_float(rt: Any, qtype: str) -> Tensor:
        raw = _raw(rt)
        return dequantize(raw.reshape(-1, raw.shape[-1]), qtype).reshape(rt.shape)

    layers_seen = set()
    factors: dict[str, dict[str, Any]] = {}  # canonical name -> {"a": rt, "b": rt} (low-rank GGUFs)
    prev = None
    for name, rt in tensors.items():
        release_if_regrouped(prev)
        prev = rt
        qtype = rt.qtype
        if name == "rope_freqs.weight":
            continue
        lr = _LOW_RANK.match(name)
        if lr:
            layer, kind, expert, which = int(lr.group(1)), lr.group(2), lr.group(3), lr.group(4)
            if layer >= cfg.num_layers:
                raise WeightsError(f"{path}: tensor {name} is for layer {layer}, but block_count is {cfg.num_layers}")
            if (expert is not None) != cfg.is_moe:
                raise WeightsError(f"{path}: unexpected tensor {name} ({'MoE' if cfg.is_moe else 'dense'} model)")
            if expert is not None and int(expert) >= cfg.num_experts:
                raise WeightsError(f"{path}: tensor {name} is for expert {expert}, "
                                   f"but expert_count is {cfg.num_experts}")
            canon = f"layers.{layer}." + (f"ffn.experts.{int(expert)}.{_EXPERT_NAMES[kind]}" if expert is not None
                                          else _LAYER_NAMES[kind])
            check_qtype(qtype, name)
            if which in factors.setdefault(canon, {}):
                raise WeightsError(f"{path}: duplicate low-rank factor {name}")
            factors[canon][which] = rt
            layers_seen.add(layer)
            continue
        if name in _TOP:
            canon = _TOP[name]
            if canon not in shapes:
                raise WeightsError(f"{path}: unexpected tensor {name}")
            want = shapes[canon]
            check(rt, qtype, want, canon)
            if shard is not None and not shard.holds(canon):
                continue
            if canon == "norm":
                put(canon, small_float(rt, qtype), rt)
            else:
                put(canon, linear(_raw(rt), qtype, want, name), rt)
            continue
        m = _LAYER.match(name)
        if not m:
            raise WeightsError(f"{path}: unexpected tensor {name} (not part of a llama model)")
        layer, kind, expert = int(m.group(1)), m.group(2), m.group(3)
        if layer >= cfg.num_layers:
            raise WeightsError(f"{path}: tensor {name} is for layer {layer}, but block_count is {cfg.num_layers}")
        layers_seen.add(layer)
        p = f"layers.{layer}."
        if kind.endswith("_exps") and kind[:-5] in _EXPERT_NAMES and expert is None:
            if not cfg.is_moe:
                raise WeightsError(f"{path}: expert tensor {name} in a model with expert_count 0")
            w = _EXPERT_NAMES[kind[:-5]]
            per = shapes[p + f"ffn.experts.0.{w}"]
            check(rt, qtype, (cfg.num_experts, *per), f"{p}ffn.experts.*.{w} (stacked)")
            raw = _raw(rt)
            for e in range(cfg.num_experts):
                canon = f"{p}ffn.experts.{e}.{w}"
                if shard is not None and not shard.holds(canon):
                    continue
                part, shape = cut(canon, raw[e], qtype, per, rt, f"{name}[{e}]")
                put(canon, linear(part, qtype, shape, f"{name}[{e}]"), rt)
            continue
        if expert is not None:
            if kind not in _EXPERT_NAMES or not cfg.is_moe:
                raise WeightsError(f"{path}: unexpected tensor {name}")
            e = int(expert)
            if e >= cfg.num_experts:
                raise WeightsError(f"{path}: tensor {name} is for expert {e}, but expert_count is {cfg.num_experts}")
            canon = f"{p}ffn.experts.{e}.{_EXPERT_NAMES[kind]}"
            check(rt, qtype, shapes[canon], canon)
            if shard is not None and not shard.holds(canon):
                continue
            raw, shape = cut(canon, _raw(rt), qtype, shapes[canon], rt, name)
            put(canon, linear(raw, qtype, shape, name), rt)
            continue
        if kind not in _LAYER_NAMES:
            raise WeightsError(f"{path}: unexpected tensor {name} (not part of a llama model)")
        canon = p + _LAYER_NAMES[kind]
        if canon not in shapes:
            raise WeightsError(f"{path}: unexpected tensor {name} ({'MoE' if cfg.is_moe else 'dense'} model)")
        want = shapes[canon]
        check(rt, qtype, want, canon)
        if kind in ("attn_norm", "ffn_norm", "ffn_gate_inp"):
            put(canon, small_float(rt, qtype), rt)
            continue
        raw, shape = cut(canon, _raw(rt), qtype, want, rt, name)
        if kind in ("attn_q", "attn_k"):  # the permutation is within each head: whole heads cut first
            n_head = shape[0] // cfg.head_dim
            raw = raw.reshape(shape[0], -1).index_select(0, _qk_perm(n_head, cfg.head_dim))
        put(canon, linear(raw, qtype, shape, name), rt)
    release_if_regrouped(prev)

    if factors:
        _low_rank_weights(factors, shapes, fields, path, put, linear, cut, shard)
    elif fields.get("levante.low_rank"):
        raise WeightsError(f"{path}: levante.low_rank is set but the file has no low-rank factor tensors")

    missing = [k for k in shapes if k not in weights and (shard is None or shard.holds(k))]
    if missing:
        raise WeightsError(
            f"{path}: missing tensor(s) {', '.join(_gguf_name(k) for k in missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}"
        )

    try:
        tokenizer = _tokenizer(fields)
    except (ValueError, KeyError, TypeError) as e:  # e.g. a corrupt merges entry
        raise WeightsError(f"{path}: bad tokenizer.ggml.* metadata: {type(e).__name__}: {e}") from e
    size = path.stat().st_size
    info = {
        "format": "gguf",
        "file": str(path),
        "file_size": size,
        "gguf_version": reader.version,
        "architecture": "llama",
        "name": fields.get("general.name"),
        "file_type": fields.get("general.file_type"),
        "file_type_name": _file_type_name(fields.get("general.file_type")),
        "quantization_version": fields.get("general.quantization_version"),
        "context_length": cfg.max_position_embeddings,
        "tensor_count": len(tensors),
        "tensor_types": dict(Counter(t.qtype for t in tensors.values())),
        "n_params": int(sum(int(t.n_elements) for t in tensors.values())),
        "alignment": int(reader.alignment),
        "tokenizer_model": fields.get("tokenizer.ggml.model"),
        "metadata": {k: v for k, v in fields.items() if not isinstance(v, list)},
    }
    return Checkpoint(config=cfg, weights=weights, format="gguf", tokenizer=tokenizer, sources=sources, info=info)


def _low_rank_weights(factors: dict[str, dict[str, Any]], shapes: dict[str, tuple[int, ...]],
                      fields: dict[str, Any], path: Path, put: Any, linear: Any, cut: Any,
                      shard: Shard | None) -> None:
    """Check the A / B factor pairs and put a LowRankWeight of two quantized weights for each."""
    from ..quant.lowrank import LowRankWeight

    if not fields.get("levante.low_rank"):
        some = next(iter(factors.values()))
        raise WeightsError(f"{path}: tensor {next(iter(some.values())).name} is a low-rank factor, "
                           "but the file lacks the levante.low_rank metadata key")
    names = fields.get("levante.low_rank.tensors") or []
    ranks = fields.get("levante.low_rank.ranks") or []
    if len(names) != len(ranks):
        raise WeightsError(f"{path}: levante.low_rank.tensors has {len(names)} entries but "
                           f"levante.low_rank.ranks has {len(ranks)}")
    declared = dict(zip(names, (int(r) for r in ranks)))
    seen = set()
    for canon, pair in factors.items():
        some = next(iter(pair.values())).name
        base = some.rsplit(".lr_", 1)[0]
        seen.add(base)
        for which, other in (("a", "b"), ("b", "a")):
            if which not in pair:
                raise WeightsError(f"{path}: low-rank factor {base}.lr_{which}.weight is missing "
                                   f"(found {pair[other].name})")
        ra, rb = pair["a"], pair["b"]
        out_f, in_f = shapes[canon]
        sa, sb = ra.shape, rb.shape
        if len(sa) != 2 or sa[1] != in_f or sa[0] < 1:
            raise WeightsError(f"{path}: tensor {ra.name} has shape {sa}, expected (rank, {in_f}) for the A factor "
                               f"of {canon} [{out_f}, {in_f}]")
        r = sa[0]
        if sb != (out_f, r):
            raise WeightsError(f"{path}: tensor {rb.name} has shape {sb}, expected ({out_f}, {r}) for the B factor "
                               f"of {canon} [{out_f}, {in_f}] (its A factor {ra.name} has rank {r})")
        if base in declared and not 0 < declared[base] <= r:
            raise WeightsError(f"{path}: levante.low_rank.ranks gives rank {declared[base]} for {base}, "
                               f"but its factors {ra.name} / {rb.name} have rank {r}")
        if shard is not None and not shard.holds(canon):
            continue
        d = shard.split(canon) if shard is not None else None  # rows: B's rows; columns: A's columns
        (a_raw, a_shape), (b_raw, b_shape) = (_raw(ra), (r, in_f)), (_raw(rb), (out_f, r))
        if d == 1:
            a_raw, a_shape = cut(canon, a_raw, ra.qtype, a_shape, ra, ra.name, dim=1)
        elif d == 0:
            b_raw, b_shape = cut(canon, b_raw, rb.qtype, b_shape, rb, rb.name, dim=0)
        a, b = linear(a_raw, ra.qtype, a_shape, ra.name), linear(b_raw, rb.qtype, b_shape, rb.name)
        put(canon, LowRankWeight(a, b, true_rank=declared.get(base)), ra)
    extra = sorted(set(declared) - seen)
    if extra:
        raise WeightsError(f"{path}: levante.low_rank.tensors lists {extra[0]}, which has no lr_a / lr_b tensors")


def _gguf_name(canon: str) -> str:
    rev_top = {v: k for k, v in _TOP.items()}
    if canon in rev_top:
        return rev_top[canon]
    m = re.match(r"^layers\.(\d+)\.(.+)$", canon)
    if not m:
        return canon
    layer, rest = m.groups()
    e = re.match(r"^ffn\.experts\.(\d+)\.(w[123])$", rest)
    if e:
        kind = {v: k for k, v in _EXPERT_NAMES.items()}[e.group(2)]
        return f"blk.{layer}.{kind}_exps.weight (expert {e.group(1)})"
    kind = {v: k for k, v in _LAYER_NAMES.items()}.get(rest, rest)
    return f"blk.{layer}.{kind}.weight"


# general.file_type -> name (llama.h's llama_ftype, without "MOSTLY_")
_FILE_TYPES = {
    0: "ALL_F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS",
    20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
    1024: "GUESSED",
}


def _file_type_name(ft: Any) -> str | None:
    try:
        return _FILE_TYPES.get(int(ft))
    except (TypeError, ValueError):
        return None


def _tokenizer(fields: dict[str, Any]) -> Any:
    if "tokenizer.ggml.tokens" not in fields:
        return None
    try:
        from ..tokenizer import tokenizer_from_gguf_fields
    except ImportError:
        return None
    return tokenizer_from_gguf_fields(fields)
