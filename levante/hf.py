"""A transformers-compatible front end: `AutoModelForCausalLM`, `AutoTokenizer` and friends.

Model-card code written for transformers runs unchanged with ``from levante import ...``::

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    model = AutoModelForCausalLM.from_pretrained(model_id)
    inputs = tokenizer.apply_chat_template(messages, return_tensors="pt")
    outputs = model.generate(inputs, max_new_tokens=20)
    print(tokenizer.decode(outputs[0], skip_special_tokens=True))

Defaults follow transformers 5: `apply_chat_template` tokenizes, returns a `BatchEncoding`
(``return_dict=True``) and does not add the generation prompt; `generate` is greedy with a total
length of 20 (prompt included) unless `max_new_tokens` / the checkpoint's generation_config.json say
otherwise; the EOS token is part of the output and finished rows are padded with `pad_token_id`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .generate import DEFAULT_N_CTX
from .loader import LoadedModel, eager_attention, load, resolve_path
from .model import CausalLM, check_token_ids
from .quant.base import DenseWeight, QuantWeight

__all__ = [
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "BatchEncoding",
    "HFTokenizer",
    "HFModel",
    "quantize_model",
]

# transformers 5 GenerationConfig._get_default_generation_params (the ones levante implements)
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": None, "max_new_tokens": None, "do_sample": False, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0, "num_return_sequences": 1, "num_beams": 1,
    "eos_token_id": None, "pad_token_id": None, "bos_token_id": None,
}  # fmt: skip


# ------------------------------------------------------------------------------------ BatchEncoding
class BatchEncoding(dict):
    """A dict of tokenizer outputs with attribute access and `.to(device)` (like transformers')."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.items()})


def _ids_list(ids: Any) -> list[int]:
    if isinstance(ids, Tensor):
        return [int(ids.item())] if ids.ndim == 0 else [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------------- tokenizer
class HFTokenizer:
    """Wraps a levante `Tokenizer` with the transformers tokenizer interface."""

    padding_side = "left"

    def __init__(self, tok, name_or_path: str = "") -> None:
        self.tok = tok
        self.name_or_path = name_or_path
        self._pad_id = tok.pad_id

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, **kwargs: Any) -> HFTokenizer:
        _warn_ignored("AutoTokenizer.from_pretrained", kwargs, ("trust_remote_code", "use_fast"))
        path = resolve_path(path_or_repo)
        tok = _read_tokenizer(path)
        out = cls(tok, str(path_or_repo))
        if "padding_side" in kwargs:
            out.padding_side = kwargs["padding_side"]
        return out

    # --- special tokens -------------------------------------------------------------------------
    def _piece(self, i: int | None) -> str | None:
        return None if i is None else self.tok.id_to_piece(i)

    @property
    def bos_token_id(self) -> int | None:
        return self.tok.bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tok.eos_id

    @property
    def unk_token_id(self) -> int | None:
        return self.tok.unk_id

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_id

    @pad_token_id.setter
    def pad_token_id(self, value: int | None) -> None:
        self._pad_id = None if value is None else int(value)

    @property
    def bos_token(self) -> str | None:
        return self._piece(self.tok.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._piece(self.tok.eos_id)

    @property
    def pad_token(self) -> str | None:
        return self._piece(self._pad_id)

    @pad_token.setter
    def pad_token(self, value: str | None) -> None:
        if value is None:
            self._pad_id = None
            return
        i = self.tok.piece_to_id(value)
        if i is None:
            raise ValueError(f"{value!r} is not a token of this vocabulary (levante cannot add tokens)")
        self._pad_id = i

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.tok.special_ids)

    @property
    def chat_template(self) -> str | None:
        return self.tok.chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def __len__(self) -> int:
        return self.tok.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self.tok._vocab)

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            return self.tok.piece_to_id(tokens)
        return [self.tok.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]):
        if isinstance(ids, int):
            return self.tok.id_to_piece(ids)
        return [self.tok.id_to_piece(i) for i in _ids_list(ids)]

    # --- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None, **kwargs):
        ids = self._encode_one(text, add_special_tokens)
        if return_tensors == "pt":
            return torch.tensor([ids], dtype=torch.long)
        return ids

    def _encode_one(self, text: str, add_special_tokens: bool) -> list[int]:
        flag = None if add_special_tokens else False
        return self.tok.encode(text, add_bos=flag, add_eos=flag, special=True)

    def __call__(
        self,
        text: str | Sequence[str],
        return_tensors: str | None = None,
        padding: bool | str = False,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        return_attention_mask: bool = True,
        **kwargs: Any,
    ) -> BatchEncoding:
        _warn_ignored("tokenizer(...)", kwargs)
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        ids = [self._encode_one(t, add_special_tokens) for t in texts]
        if truncation and max_length is not None:
            ids = [i[:max_length] if self.padding_side == "right" else i[-max_length:] for i in ids]
        return self._batch(ids, batched, return_tensors, padding, max_length, return_attention_mask)

    def _batch(
        self,
        ids: list[list[int]],
        batched: bool,
        return_tensors: str | None,
        padding: bool | str,
        max_length: int | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        masks = [[1] * len(i) for i in ids]
        if padding in (True, "longest", "max_length"):
            target = max(len(i) for i in ids)
            if padding == "max_length" and max_length is not None:
                target = max(target, max_length)
            if any(len(i) < target for i in ids):
                if self._pad_id is None:
                    raise ValueError(
                        "Asking to pad but the tokenizer does not have a padding token. Set one with "
                        "`tokenizer.pad_token = tokenizer.eos_token`."
                    )
                left = self.padding_side == "left"
                for k, (i, m) in enumerate(zip(ids, masks)):
                    n = target - len(i)
                    ids[k] = [self._pad_id] * n + i if left else i + [self._pad_id] * n
                    masks[k] = [0] * n + m if left else m + [0] * n
        if return_tensors == "pt":
            if len({len(i) for i in ids}) > 1:
                raise ValueError("Unable to create tensor: sequences have different lengths; use padding=True")
            out = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(masks)}
        elif return_tensors is None:
            out = {"input_ids": ids if batched else ids[0], "attention_mask": masks if batched else masks[0]}
        else:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        if not return_attention_mask:
            out.pop("attention_mask")
        return BatchEncoding(out)

    # --- decoding -------------------------------------------------------------------------------
    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if isinstance(token_ids, Tensor) and token_ids.ndim > 1:
            if token_ids.shape[0] != 1:
                raise ValueError("decode() takes one sequence; use batch_decode for a batch")
            token_ids = token_ids[0]
        ids = _ids_list(token_ids)
        if skip_special_tokens and self._pad_id is not None:
            ids = [i for i in ids if i != self._pad_id]
        return self.tok.decode(ids, skip_special=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # --- chat -----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        return_tensors: str | None = None,
        return_dict: bool = True,
        padding: bool | str = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        """transformers 5 semantics: returns a BatchEncoding by default; the rendered string with tokenize=False.

        Like transformers, the rendered text is tokenized with special tokens parsed everywhere, so a special-
        token string inside a message content becomes that control token (this class mirrors transformers).
        `LLM.create_chat_completion`, the server and `levante chat` encode contents as text instead
        (levante.chat.apply_chat)."""
        from .chat import mistral_instruct_ids, normalize_messages, render_chat_template
        from .tokenizer import SentencePieceTokenizer

        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and isinstance(conversation[0], (list, tuple))
        )
        convs = list(conversation) if batched else [conversation]
        template = chat_template or self.tok.chat_template
        texts: list[str] = []
        ids: list[list[int]] = []
        for conv in convs:
            msgs = normalize_messages(conv)
            if template:
                text = render_chat_template(
                    template, msgs, add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
                )  # fmt: skip
                texts.append(text)
                if tokenize:  # like transformers: the template writes the special tokens itself
                    ids.append(self.tok.encode(text, add_bos=False, add_eos=False, special=True))
            elif isinstance(self.tok, SentencePieceTokenizer):
                row = mistral_instruct_ids(self.tok, msgs)
                ids.append(row)
                texts.append(self.tok.decode(row, skip_special=False))
            else:
                from .chat import chatml_text

                text = chatml_text(msgs, add_generation_prompt)
                texts.append(text)
                ids.append(self.tok.encode(text, add_bos=False, add_eos=False, special=True))
        if not tokenize:
            return texts if batched else texts[0]
        enc = self._batch(ids, batched, return_tensors, padding)
        return enc if return_dict else enc["input_ids"]


def _read_tokenizer(path: Path):
    from .tokenizer import load_tokenizer

    if path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        return load_tokenizer(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.json, tokenizer.model or one .gguf")
        path = ggufs[0]
    from .formats.gguf import _tokenizer, open_gguf

    tok = _tokenizer(open_gguf(path).fields)  # metadata only: no tensor is read
    if tok is None:
        raise FileNotFoundError(f"{path} holds no tokenizer")
    return tok


# -------------------------------------------------------------------------------------- quantizing
def quantize_model(net: nn.Module, bits: int) -> nn.Module:
    """Replace every float `DenseWeight` (not norms, not the MoE router) by int8 or 4-bit weights.

    8 bits: `Int8Weight` (symmetric, per output row). 4 bits: GGML Q4_0 blocks (group 32, fused
    kernel); a weight whose in_features is not a multiple of 32 falls back to int8.
    """
    from .model import MoE
    from .quant.int8 import Int8Weight

    done: dict[int, QuantWeight] = {}

    def convert(w: DenseWeight) -> QuantWeight:
        if id(w) in done:  # tied embeddings stay tied
            return done[id(w)]
        dense = w.weight.detach().float().cpu()
        if bits == 4 and w.in_features % 32 == 0:
            from .quant.kernels import fast_weight
            from .quant.kquants import quantize

            raw = torch.from_numpy(quantize(dense.numpy(), "Q4_0"))
            new: QuantWeight = fast_weight(raw, "Q4_0", w.out_features, w.in_features)
        else:
            new = Int8Weight.from_float(dense)
        done[id(w)] = new.to(w.weight.device)
        return done[id(w)]

    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DenseWeight) and not (isinstance(module, MoE) and name == "gate"):
                setattr(module, name, convert(child))
    return net


# ------------------------------------------------------------------------------------------ models
def _warn_ignored(where: str, kwargs: Mapping[str, Any], silent: Sequence[str] = ()) -> None:
    loud = [k for k in kwargs if k not in silent]
    if loud:
        warnings.warn(f"{where}: levante ignores {', '.join(sorted(loud))}", stacklevel=3)


def _device(device_map: Any) -> str:
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        devs = set(device_map.values())
        if len(devs) != 1:
            raise ValueError("levante runs a model on one device; device_map dicts must name a single device")
        device_map = devs.pop()
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    return str(device_map)


def _hf_config(loaded: LoadedModel) -> SimpleNamespace:
    c = loaded.config
    return SimpleNamespace(
        model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
        max_position_embeddings=c.max_position_embeddings, sliding_window=c.sliding_window,
        num_local_experts=c.num_experts or None, num_experts_per_tok=c.num_experts_per_tok if c.num_experts else None,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, num_labels=c.num_labels, id2label=dict(c.id2label),
        torch_dtype=loaded.dtype, dtype=loaded.dtype, name_or_path=str(loaded.path),
    )  # fmt: skip


def _generation_defaults(loaded: LoadedModel) -> dict[str, Any]:
    gen = dict(GENERATION_DEFAULTS)
    c = loaded.config
    gen.update(eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id, pad_token_id=c.pad_token_id)
    if loaded.format == "gguf" and loaded.tokenizer is not None:
        eos = sorted(loaded.tokenizer.eos_ids)
        if eos:
            gen["eos_token_id"] = eos
    directory = loaded.path if loaded.path.is_dir() else loaded.path.parent
    f = directory / "generation_config.json"
    if f.is_file():
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        gen.update({k: v for k, v in data.items() if k in GENERATION_DEFAULTS and v is not None})
    return gen


class _NoText:
    """Stand-in tokenizer for a checkpoint without one: generation needs no text."""

    _decode_errors = "replace"
    eos_ids: set[int] = set()

    def _decode_piece(self, token_id: int, skip_special: bool, at_start: bool) -> tuple[bytes, bool]:
        return b"", False


def _positions(mask: Tensor) -> Tensor:
    """transformers' position ids from an attention mask; -1 (levante: padding) where mask == 0."""
    mask = mask.long()
    return torch.where(mask.bool(), mask.cumsum(-1) - 1, torch.full_like(mask, -1))


class HFModel(nn.Module):
    """A levante model behind transformers' interface (`__call__` returning `.logits`, `generate`)."""

    _head = "causal_lm"

    def __init__(self, loaded: LoadedModel, quantization: str | None = None) -> None:
        super().__init__()
        self.net = loaded.model
        self.loaded = loaded
        self.config = _hf_config(loaded)
        self.generation_config = SimpleNamespace(**_generation_defaults(loaded))
        self.name_or_path = str(loaded.path)
        self.quantization = quantization

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | Path,
        torch_dtype: str | torch.dtype | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: Any = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        **kwargs: Any,
    ) -> HFModel:
        if load_in_8bit and load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit cannot both be set")
        _warn_ignored(
            f"{cls.__name__}.from_pretrained", kwargs, ("trust_remote_code", "low_cpu_mem_usage", "attn_implementation")
        )
        want = dtype if dtype is not None else torch_dtype
        bits = 8 if load_in_8bit else 4 if load_in_4bit else 0
        dev = _device(device_map)
        if not bits:  # straight onto the device: a GPU's weights stream from the mapped files, its dtype 16-bit
            return cls(load(path_or_repo, dtype=want, head=cls._head, device=dev))
        loaded = load(path_or_repo, dtype=want, head=cls._head, device="cpu")
        quantize_model(loaded.model, bits)  # on the host, then moved
        if dev != "cpu":
            from .loader import resolve_device

            device = resolve_device(dev)
            if device.type == "cuda":  # quantized weights stay quantized there (levante.cuda)
                from .cuda import to_device

                to_device(loaded.model, device)
            else:
                loaded.model.to(device)
        return cls(loaded, {8: "int8", 4: "q4_0"}.get(bits))

    def _generation_net(self) -> nn.Module:
        """What `generate` runs: on a GPU levante.cuda's decoder (static cache, CUDA graphs), made once and warmed
        up as an LLM's (its kernels compiled in parallel, a cache of an LLM's default n_ctx, DEFAULT_N_CTX tokens,
        and the batch-1 step captured; a longer generation makes a bigger cache then)."""
        if self.net.model.device.type != "cuda" or not isinstance(self.net, CausalLM):
            return self.net
        if "_decoder" not in self.__dict__:
            from .cuda import CudaDecoder

            decoder = CudaDecoder(self.net)
            decoder.warm_up(1, min(self.loaded.config.max_position_embeddings, DEFAULT_N_CTX))
            self.__dict__["_decoder"] = decoder
        return self.__dict__["_decoder"]

    # --- nn.Module-ish ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.net.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.dtype

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of weights (parameters and buffers), each shared tensor counted once."""
        seen: set[int] = set()
        total = 0
        for t in list(self.net.parameters()) + (list(self.net.buffers()) if return_buffers else []):
            key = t.untyped_storage().data_ptr() if t.numel() else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes() if t.numel() else 0
        return total

    def _inputs(self, input_ids: Any, attention_mask: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(input_ids, Mapping):
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        if input_ids is None:
            raise ValueError("input_ids is required")
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids[None]
        check_token_ids(ids, self.loaded.config.vocab_size, "input")
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(ids.shape)
        return ids, mask

    def forward(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> SimpleNamespace:
        _warn_ignored(f"{type(self).__name__}.forward", kwargs, ("use_cache", "return_dict"))
        ids, mask = self._inputs(input_ids, attention_mask)
        dev = self.device
        pos = None if mask is None or bool(mask.all()) else _positions(mask).to(dev)
        with torch.inference_mode(), eager_attention(dev):
            logits = self.net(ids.to(dev), pos)
        return SimpleNamespace(logits=logits.float())


class _CausalLM(HFModel):
    def generate(self, inputs: Any = None, generation_config: Any = None, **kwargs: Any) -> Tensor:
        """Greedy or sampled generation; returns prompt + new tokens [B, T + new], transformers-style."""
        from .generate import generate_stream
        from .sampling import SamplingParams

        input_ids = kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if inputs is None:
            inputs = input_ids
        ids, mask = self._inputs(inputs, attention_mask)
        g = dict(vars(self.generation_config))
        if generation_config is not None:
            extra = (
                generation_config.to_dict()
                if hasattr(generation_config, "to_dict")
                else dict(vars(generation_config) if not isinstance(generation_config, Mapping) else generation_config)
            )
            g.update({k: v for k, v in extra.items() if k in GENERATION_DEFAULTS and v is not None})
        for k in list(kwargs):
            if k in GENERATION_DEFAULTS:
                v = kwargs.pop(k)
                if v is not None:
                    g[k] = v
        return_dict = kwargs.pop("return_dict_in_generate", False)
        _warn_ignored("generate", kwargs, ("use_cache", "streamer"))
        if g["num_beams"] != 1:
            raise NotImplementedError("beam search is not supported by levante (num_beams must be 1)")

        eos = g["eos_token_id"]
        eos_ids = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}
        pad = g["pad_token_id"]
        if pad is None:
            pad = eos if isinstance(eos, int) else (list(eos)[0] if eos else 0)  # transformers: eos[0]
        if mask is None:  # transformers' inference: pad tokens are padding unless pad == eos
            if pad is not None and pad not in eos_ids and bool((ids == pad).any()):
                mask = (ids != pad).long()
            else:
                mask = torch.ones_like(ids)
        T = ids.shape[1]
        if g["max_new_tokens"] is not None:
            new = int(g["max_new_tokens"])
        elif g["max_length"] is None:  # transformers 5: nobody set max_length -> 20 new tokens
            new = min(20, self.config.max_position_embeddings - T)
        else:
            new = int(g["max_length"]) - T
            if new < 1:
                warnings.warn(
                    f"input length {T} >= max_length {g['max_length']}: generating 1 token; set max_new_tokens",
                    stacklevel=2,
                )
                new = 1
        n = int(g["num_return_sequences"])
        if n > 1:
            ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        rp = float(g["repetition_penalty"])
        if g["do_sample"]:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed like transformers
            params = [SamplingParams(
                temperature=float(g["temperature"]), top_k=int(g["top_k"] or 0), top_p=float(g["top_p"]),
                min_p=float(g["min_p"] or 0.0), repeat_penalty=rp, repeat_last_n=-1, seed=seed + i,
            ) for i in range(len(prompts))]  # fmt: skip
        else:
            params = [SamplingParams.greedy(repeat_penalty=rp, repeat_last_n=-1)] * len(prompts)
        tok = self.loaded.tokenizer if self.loaded.tokenizer is not None else _NoText()
        out: list[list[int]] = [[] for _ in prompts]
        if new > 0:
            for ev in generate_stream(self._generation_net(), tok, prompts, new, params, stop_token_ids=eos_ids):
                out[ev.row].append(ev.token)
        width = max(len(o) for o in out)
        gen = torch.full((len(out), width), int(pad), dtype=torch.long)
        for i, o in enumerate(out):
            gen[i, : len(o)] = torch.tensor(o, dtype=torch.long)
        seqs = torch.cat([ids, gen], dim=1).to(self.device)
        return SimpleNamespace(sequences=seqs) if return_dict else seqs


class _SequenceClassifier(HFModel):
    _head = "sequence_classification"


class _TokenClassifier(HFModel):
    _head = "token_classification"


class AutoModelForCausalLM:
    """`AutoModelForCausalLM.from_pretrained(path_or_repo, ...)` -> a levante model with transformers' API."""

    @staticmethod
    def from_pretrained(path_or_repo: str | Path, *args: Any, **kwargs: Any) -> _CausalLM:
        return _CausalLM.from_pretrained(path_or_repo, *args, **kwargs)


class AutoModelForSequenceClassification:
    @staticmethod
    def from_pretrained(path_or_repo: str | Path, *args: Any, **kwargs: Any) -> _SequenceClassifier:
        return _SequenceClassifier.from_pretrained(path_or_repo, *args, **kwargs)


class AutoModelForTokenClassification:
    @staticmethod
    def from_pretrained(path_or_repo: str | Path, *args: Any, **kwargs: Any) -> _TokenClassifier:
        return _TokenClassifier.from_pretrained(path_or_repo, *args, **kwargs)


class AutoTokenizer:
    @staticmethod
    def from_pretrained(path_or_repo: str | Path, **kwargs: Any) -> HFTokenizer:
        return HFTokenizer.from_pretrained(path_or_repo, **kwargs)
