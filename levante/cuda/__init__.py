"""The CUDA backend: quantized weights that stay quantized on the GPU (Triton kernels).

`pack_weights` replaces every GGUF-block and AWQ weight of a built model by a `PackedWeight` (levante.cuda.packed:
bit planes and scales, the same values), whose matmul is the Triton kernel of levante.cuda.triton_matmul;
`to_device` does that, moves the model and replaces its MoE layers by `FusedMoE` (levante.cuda.moe: routing on the
device, grouped GEMMs). `CudaDecoder` (levante.cuda.decoder) is generation's GPU path: a static KV cache, Triton
attention and a CUDA graph per batch bucket. Float weights stay as they are. Every kernel also runs on CPU tensors
under TRITON_INTERPRET=1 (how the tests run them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import DeviceMemoryError
from ..quant.awq import AWQWeight
from ..quant.base import QuantWeight
from ..quant.ggml import GGMLWeight
from ..quant.int8 import Int8Weight
from ..quant.kernels import GGMLKernelWeight, Grouped16Weight
from .decoder import CudaDecoder, StaticCache, bucket_for
from .moe import FusedMoE, fuse_moe
from .packed import LAYOUTS, PackedWeight

__all__ = ["CudaDecoder", "FusedMoE", "PackedWeight", "StaticCache", "bucket_for", "fuse_moe", "move", "pack_weight",
           "pack_weights", "planless_attention", "to_device"]


@contextmanager
def planless_attention() -> Iterator[None]:
    """For a model run eagerly on a GPU (the tensor-parallel ranks): SDPA without its cuDNN backend, which builds
    a plan for every new key length, i.e. every decode step (86% of a step's time, measured); the flash,
    memory-efficient and math kernels take any length (the mask as data)."""
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def pack_weight(w: QuantWeight, device: torch.device | str | None = None) -> PackedWeight | None:
    """The GPU layout of a GGUF-block, AWQ or int8 weight (None for other weights: float, low-rank containers);
    GGUF blocks are copied to `device` first and unpacked there."""
    if isinstance(w, Grouped16Weight):
        raw = w.ggml_blocks()
    elif isinstance(w, GGMLKernelWeight | GGMLWeight):
        raw = w.data
    elif isinstance(w, AWQWeight):
        return PackedWeight.from_awq(w._codes(0, w.out_features), w.zeros, w._scales(), w.group_size)
    elif isinstance(w, Int8Weight):
        return PackedWeight.from_int8(w.q.cpu(), w.scale.cpu())
    else:
        return None
    if w.qtype not in LAYOUTS:
        return None
    if device is not None:
        raw = raw.to(device)
    return PackedWeight.from_ggml(raw, w.qtype, w.out_features, w.in_features)


def pack_weights(net: nn.Module, device: torch.device | str | None = None, progress: bool = False) -> int:
    """Replace the model's quantized weights by PackedWeights in place (GGUF blocks unpacked on `device`, AWQ and
    int8 weights packed on the host and moved at once: host memory holds one packed weight at a time); returns
    how many. A weight shared by two modules (tied embeddings) stays shared."""
    done: dict[int, PackedWeight] = {}
    parents = list(net.modules())
    if progress:
        from tqdm import tqdm

        parents = tqdm(parents, desc=f"packing for {device}", unit="module", leave=False)
    for parent in parents:
        for name, child in list(parent.named_children()):
            if not isinstance(child, QuantWeight) or isinstance(child, PackedWeight):
                continue
            packed = done.get(id(child))
            if packed is None:
                packed = pack_weight(child, device)
                if packed is None:
                    continue
                if device is not None:
                    packed = packed.to(device)
                done[id(child)] = packed
            setattr(parent, name, packed)
    return len(done)


def move(net: nn.Module, device: torch.device | str, progress: bool = False) -> None:
    """net.to(device), one module's own tensors at a time, so that `progress` can show the bytes moved: a model
    read from memory-mapped files is read from disk here, the long step of a large model's load."""
    modules = list(net.modules())
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
        bar = tqdm(total=total, desc=f"copying to {device}", unit="B", unit_scale=True, leave=False)
    for m in modules:
        own = sum(t.numel() * t.element_size() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
        m._apply(lambda t: t.to(device), recurse=False)
        if bar is not None:
            bar.update(own)
    if bar is not None:
        bar.close()


def to_device(net: nn.Module, device: torch.device | str, progress: bool = False) -> nn.Module:
    """`net` on `device` (CUDA; any device in the tests): quantized weights packed for the Triton kernels, MoE
    layers fused. GGUF blocks are unpacked on the device, AWQ / int8 weights packed on the host and moved at once
    (the host holds one packed copy at a time); float weights that are views of memory-mapped files are copied
    straight to the device."""
    size = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    try:
        pack_weights(net, device, progress)
        move(net, device, progress)
        fuse_moe(net)
    except torch.OutOfMemoryError as e:
        torch_says = str(e).splitlines()[0][:200]
        raise DeviceMemoryError(
            f"the model ({size / 2**30:.1f} GiB of weights) does not fit in {device}'s memory: use a smaller "
            f"quantization (e.g. a Q4_K_M GGUF) or spread it over GPUs (tensor_parallel_size / --tp); {torch_says}"
        ) from None
    return net
