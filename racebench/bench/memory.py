"""Peak-memory probes and memory caps, one per device kind (DESIGN.md, "Measurement protocol")."""

from __future__ import annotations

import contextlib
import ctypes
import resource

import torch

# Thread stacks and allocator arenas are address space too: the cap leaves this much above the budget.
_AS_HEADROOM = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8


def _mallopt(*settings: tuple[int, int]) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: keep the allocator's defaults
        libc = ctypes.CDLL("libc.so.6")
        for option, value in settings:
            libc.mallopt(option, value)


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
        # Until timing starts, freed tensors go back to the OS at once, so the resident set tracks live memory;
        # one malloc arena, since each extra arena reserves 64 MiB of address space against the cap.
        _mallopt((_M_MMAP_THRESHOLD, 1 << 16), (_M_TRIM_THRESHOLD, 1 << 16), (_M_ARENA_MAX, 1))
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

    def cache_for_timing(self) -> None:
        """From now on keep freed memory for reuse, as a caching allocator (or jemalloc/tcmalloc, which
        PyTorch's CPU tuning guide recommends) would: timed passes then measure steady-state work, not the
        kernel zeroing fresh pages for every output (2-4x slower than reuse on a VM). Same for every method.

        Whether the point fits its budget was settled by the passes before, under the strict cap; a cache
        fragments, so the timed passes get a quarter of the budget more address space."""
        _mallopt((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_AS, (soft + self.budget // 4, hard))


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

    def cache_for_timing(self) -> None:
        pass  # the CUDA caching allocator already reuses memory


def for_device(device: str, budget: int):
    return CudaMemory(budget) if device == "cuda" else CpuMemory(budget)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
