"""Peak-memory probes and memory caps, one per device kind (DESIGN.md, "Measurement protocol")."""

from __future__ import annotations

import contextlib
import ctypes
import resource

import torch

# Thread stacks and allocator arenas are address space too: the cap leaves this much above the budget.
_AS_HEADROOM = 256 * 2**20


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class CpuMemory:
    """Resident set of this (child) process; the peak is VmHWM, reset through /proc/self/clear_refs."""

    def __init__(self, budget: int):
        self.budget = budget

    def cap(self) -> None:
        # Make freed tensors go back to the OS at once, so the resident set tracks live memory.
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: large blocks are mmapped and unmapped on free
            libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool before the cap
        # Going over the budget must fail inside this process ("can't allocate memory"), never wake the
        # kernel's OOM killer.
        limit = _proc_status("VmSize") + self.budget + _AS_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    def current(self) -> int:
        return _proc_status("VmRSS")

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return _proc_status("VmHWM")

    def sync(self) -> None:
        pass


class CudaMemory:
    """The caching allocator's view: max_memory_allocated; the budget through the per-process fraction."""

    def __init__(self, budget: int):
        self.budget = budget

    def cap(self) -> None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.budget / total))

    def current(self) -> int:
        return torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def sync(self) -> None:
        torch.cuda.synchronize()


def for_device(device: str, budget: int):
    return CudaMemory(budget) if device == "cuda" else CpuMemory(budget)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
