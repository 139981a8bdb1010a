"""A small, strict safetensors reader: memory-mapped, zero-copy, with errors that name the file.

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the tensor bytes. We parse it ourselves (instead of the `safetensors` package) to validate
every offset against the file size and to hand out `torch.from_numpy` views of one memmap.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import WeightsError

_DTYPES: dict[str, tuple[np.dtype, torch.dtype | None]] = {
    "F64": (np.dtype("<f8"), None),
    "F32": (np.dtype("<f4"), None),
    "F16": (np.dtype("<f2"), None),
    "BF16": (np.dtype("<u2"), torch.bfloat16),  # numpy has no bfloat16: view the bits
    "I64": (np.dtype("<i8"), None),
    "I32": (np.dtype("<i4"), None),
    "I16": (np.dtype("<i2"), None),
    "I8": (np.dtype("i1"), None),
    "U8": (np.dtype("u1"), None),
    "BOOL": (np.dtype("?"), None),
}


class SafetensorsFile:
    """Lazily readable safetensors file. `get(name)` returns a tensor backed by the memmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise WeightsError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise WeightsError(
                        f"{self.path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise WeightsError(f"cannot read {self.path}: {e}") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.size = size
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError) as err:
                raise WeightsError(f"{self.path}: malformed header entry for tensor {name!r}") from err
            if dtype not in _DTYPES:
                raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][0].itemsize
            if end - begin != nbytes or begin < 0:
                raise WeightsError(
                    f"{self.path}: tensor {name!r} byte range {begin}..{end} does not match shape {shape} {dtype}"
                )
            if self.data_start + end > size:
                raise WeightsError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {self.data_start + end}, "
                    f"file has {size}"
                )
            self.entries[name] = (dtype, shape, begin, end)
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def get(self, name: str) -> Tensor:
        if name not in self.entries:
            raise WeightsError(f"{self.path}: no tensor named {name!r}")
        dtype, shape, begin, end = self.entries[name]
        if self._mm is None:
            # Copy-on-write private mapping: writable for torch, pages are shared until touched.
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="c")
        np_dtype, torch_view = _DTYPES[dtype]
        arr = self._mm[self.data_start + begin : self.data_start + end].view(np_dtype).reshape(shape)
        t = torch.from_numpy(arr)
        return t.view(torch_view) if torch_view is not None else t

    def release(self) -> None:
        """Drop this file's resident pages from the process (they are re-read from disk when touched again).

        For streaming readers (`levante.quant.awq.awq_quantize`) that walk a checkpoint larger than RAM:
        without it, every page read stays in the process's RSS until memory runs short. The mapping is
        copy-on-write, so bytes written through a tensor from `get` would revert to the file's: call it
        only when no such tensor was written to. A no-op where madvise is unavailable."""
        mm = getattr(self._mm, "_mmap", None) if self._mm is not None else None
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as a safetensors file (used by converters and test fixtures)."""
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs = []
    offset = 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
