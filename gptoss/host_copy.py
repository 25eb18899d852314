"""Moving small tensors between host and GPU without stalling on the work queued on the stream.

A step launched ahead (TokenGenerator, the engine) sits on the stream while the host reads the previous step's
tokens and prepares the next one. `.tolist()` / `int()` of a device tensor would wait for all of that queued work,
and so would a copy *to* the device from pageable memory (CUDA first drains the stream); pinned memory and events
avoid both.
"""

import torch


class HostCopy:
    """Copies of `tensors` in pinned host memory, started now; wait() blocks until they are done (not until later
    work on the stream is) and returns them. Off CUDA the tensors are returned as they are."""

    def __init__(self, *tensors: torch.Tensor):
        self._copies = [t.to("cpu", non_blocking=True) for t in tensors]
        self._ready = None
        if any(t.is_cuda for t in tensors):
            self._ready = torch.cuda.Event()
            self._ready.record()

    def wait(self) -> list[torch.Tensor]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._copies


def to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """values (numbers, nested lists of them, or a CPU tensor) as a tensor of dtype on device, copied from pinned
    memory (torch.tensor(values, device=...) copies from pageable memory, which waits for the stream's queued work)."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
