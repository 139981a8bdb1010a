"""What the CPU's KV cache (levante.model.KVCache) and the GPU's static one (levante.cuda.decoder.StaticCache)
share: each layer's keys and values as [rows, kv heads, slots, head dim] tensors, and the steps held per row."""

from __future__ import annotations

from torch import Tensor


class RowCache:
    """Keys `k` and values `v` (one tensor per layer), `capacity` slots per row, `lengths`: steps held per row;
    `rolling`: the slots are a ring buffer of a sliding `window` (slot = step % capacity)."""

    k: list[Tensor]
    v: list[Tensor]
    capacity: int
    lengths: list[int]
    rolling: bool
    window: int | None
    # the tag of whoever filled it last, for users that take turns at one cache (a GPU decoder has one: the
    # speculative drafts of a server's requests)
    owner: object = None

    @property
    def write_limit(self) -> int:
        """The most steps one forward call may write per row, and the most a row that wrapped around may take
        back: a ring buffer must keep the keys its window still sees."""
        return self.capacity - self.window + 1 if self.rolling else self.capacity

    def check_take_back(self, row: int, n_steps: int) -> None:
        """ValueError when cutting `row` back to `n_steps` steps would need keys a wrapped ring buffer overwrote."""
        n = self.lengths[row]
        if self.rolling and n > self.capacity and n - n_steps > self.write_limit:
            raise ValueError(f"cannot take back {n - n_steps} steps of a ring buffer that has wrapped around "
                             f"(at most {self.write_limit})")

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
