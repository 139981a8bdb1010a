"""What the CPU's KV cache (levante.model.KVCache) and the GPU's static one (levante.cuda.decoder.StaticCache)
share: each layer's keys and values as [rows, kv heads, slots, head dim] tensors, and the steps held per row."""

from __future__ import annotations

from torch import Tensor


class RowCache:
    """Keys `k` and values `v` (one tensor per layer), `capacity` slots per row, `lengths`: steps held per row."""

    k: list[Tensor]
    v: list[Tensor]
    capacity: int
    lengths: list[int]

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange rows `a` and `b` (the engine keeps its active rows contiguous); only the slots in use move."""
        m = min(max(self.lengths[a], self.lengths[b]), self.capacity)
        if m:
            for t in self.k + self.v:
                tmp = t[a, :, :m].clone()
                t[a, :, :m] = t[b, :, :m]
                t[b, :, :m] = tmp
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
