"""Timing one model call: its milliseconds and its peak memory (`PeakMemory`), for the bench's
methods, its stacks and `agentsd compare`'s memory per image."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch


class PeakMemory:
    """Peak memory of the code inside: CUDA's max allocated (weights included), or on the CPU
    the growth of the process RSS over its value on entry, sampled every 5 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            self._process = psutil.Process()
            self._stop = threading.Event()
            self._start = self._rss = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._rss = max(self._rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._rss, self._process.memory_info().rss) - self._start) / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(model: Callable, inputs: tuple[tuple, dict[str, Any]], device: torch.device) -> tuple[float, float]:
    """(milliseconds, peak MB) of one call of `model` on `inputs`."""
    args, kwargs = inputs
    with PeakMemory(device) as memory:
        synchronize(device)
        start = time.perf_counter()
        model(*args, **kwargs)
        synchronize(device)
        elapsed = (time.perf_counter() - start) * 1000
    return elapsed, memory.peak_mb
