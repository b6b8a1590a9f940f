"""A float64 buffer per worker thread, kept from one tensor to the next.

A fresh buffer per tensor costs the kernel a page fault and a page of zeros per 4 KiB, often more CPU than the
sums it holds; a kept one fragments nothing. Each worker thread has its own, so workers never share memory, and
a buffer above `retained` entries (a rare giant, such as a vocabulary-aligned embedding) is used once, not kept.
"""

from __future__ import annotations

import threading

import torch


class ThreadBuffer:
    """One float64 buffer per thread, grown when a call needs more and kept up to `retained` entries."""

    def __init__(self, retained: int) -> None:
        self.retained = retained
        self._local = threading.local()

    @property
    def kept(self) -> torch.Tensor | None:
        """This thread's kept buffer, if any."""
        return getattr(self._local, "buffer", None)

    def get(self, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """`count` float64 entries: the first of this thread's kept buffer on the CPU, else a fresh buffer."""
        if torch.device(device).type != "cpu" or count > self.retained:
            return torch.empty(count, dtype=torch.float64, device=device)
        buffer = self.kept
        if buffer is None or buffer.numel() < count:
            self._local.buffer = buffer = None  # the old one freed before the new one is allocated
            self._local.buffer = buffer = torch.empty(count, dtype=torch.float64)
        return buffer[:count]

    def release(self) -> None:
        """Let this thread's buffer go (its memory is needed for something else for a while)."""
        self._local.buffer = None
