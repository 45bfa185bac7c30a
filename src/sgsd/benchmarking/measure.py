"""Wall-clock medians and peak memory of one phase (a callable that runs forward and backward).

Peak memory is the highest amount of tensor memory allocated during the phase above what was allocated
when it started (model weights are not counted; parameter gradients, which the phase creates, are):
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
- CPU: torch's allocator is not seen by `tracemalloc`; the phase is run once more under `torch.profiler`
  with `profile_memory=True`, whose allocation records carry the allocator's running total, and the
  maximum of that total is taken.
As a cross-check on Linux, each timed repeat also records the growth of the process's resident set
high-water mark (`VmHWM`, reset through `/proc/self/clear_refs` after returning freed heap memory with
`malloc_trim`) over the RSS at its start; it also counts allocator slack and non-tensor memory. Timing
repeats run without the profiler.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

MB = 1024.0 * 1024.0


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed repeats; rss_peak_mb: median resident-set growth (None off Linux)."""

    median_s: float
    min_s: float
    max_s: float
    repeats: list[float]
    rss_peak_mb: float | None


@dataclass(frozen=True)
class PeakMemory:
    """peak_mb: tensor memory allocated at the phase's peak above its start; method: how it was measured."""

    peak_mb: float
    method: str


def _is_cuda(device: torch.device | str) -> bool:
    return str(getattr(device, "type", device)).startswith("cuda")


def _synchronize(device: torch.device | str) -> None:
    import torch

    if _is_cuda(device):
        torch.cuda.synchronize(device)


def time_phase(phase: Callable[[], object], *, repeats: int, warmup: int, device: torch.device | str = "cpu",
               before: Callable[[], None] = lambda: None) -> Timing:
    """Median wall time of `phase()` over `repeats` runs after `warmup` runs; `before()` runs untimed first."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        before()
        phase()
    reset_rss, rss, hwm = _rss_tools()
    if _is_cuda(device):  # host RSS says nothing about device memory
        reset_rss, rss, hwm = (lambda: None), (lambda: None), (lambda: None)
    times, growth = [], []
    gc.collect()  # once: a full collection costs ~0.4 s with transformers loaded
    for _ in range(repeats):
        before()
        _synchronize(device)
        reset_rss()
        start_rss = rss()
        gc.disable()  # no collector pause inside a timed run
        try:
            start = time.perf_counter()
            phase()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
        peak_rss = hwm()
        if start_rss is not None and peak_rss is not None:
            growth.append(max(peak_rss - start_rss, 0.0) / MB)
    rss_mb = statistics.median(growth) if len(growth) == repeats else None
    return Timing(statistics.median(times), min(times), max(times), times, rss_mb)


def _allocator_peak_from_profile(prof: Any) -> float:
    """Max over the profiler's allocation records of (running total - total before the first record), bytes."""
    records = []

    def walk(nodes: Any) -> None:
        for node in nodes:
            fields = node.extra_fields
            if hasattr(fields, "alloc_size") and hasattr(fields, "total_allocated"):
                if getattr(fields, "device", None) is None or str(fields.device).startswith("cpu"):
                    records.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if not records:
        return 0.0
    records.sort(key=lambda r: r[0])
    base = records[0][2] - records[0][1]
    return float(max(total for _, _, total in records) - base)


def _rss_tools() -> tuple[Callable[[], None], Callable[[], float | None], Callable[[], float | None]]:
    """(reset high-water mark, current RSS bytes, high-water RSS bytes); no-ops off Linux."""
    status = Path("/proc/self/status")

    def read(key: str) -> float | None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith(key + ":"):
                    return float(line.split()[1]) * 1024.0
        except OSError:
            return None
        return None

    def reset() -> None:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    return reset, lambda: read("VmRSS"), lambda: read("VmHWM")


def peak_memory(phase: Callable[[], object], *, device: torch.device | str = "cpu",
                before: Callable[[], None] = lambda: None) -> PeakMemory:
    """Peak memory of one run of `phase()` above the memory in use when it starts (module docstring)."""
    import torch

    before()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        phase()
        torch.cuda.synchronize(device)
        return PeakMemory((torch.cuda.max_memory_allocated(device) - base) / MB, "cuda.max_memory_allocated")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        phase()
    return PeakMemory(_allocator_peak_from_profile(prof) / MB, "torch.profiler allocator total")
