"""Host-to-device copies that do not wait for the device.

`torch.tensor(values, device="cuda")`, or `.to("cuda")` of ordinary (pageable) host memory, synchronizes with the
stream: the host waits until every kernel queued before the copy has run. A decode step's small inputs (positions,
the rows' sampling settings and random numbers, the penalties' token windows, grammar masks) would each stop the
host that way, so it could not queue the next step while the GPU runs the current one. These go through pinned
memory with a non-blocking copy instead, as vLLM's input buffers do: the host queues the copy and goes on; the
caching host allocator keeps the pinned block until the copy has run. Elsewhere (CPU) they are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """`t` (on the host) on `device`, without waiting for the device when it is a GPU."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_tensor(values: Sequence, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """A tensor of Python `values` on `device` (`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)
