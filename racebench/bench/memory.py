"""Peak-memory probes and memory caps, one per device kind (DESIGN.md, "Measurement protocol")."""

from __future__ import annotations

import contextlib
import ctypes
import resource

import torch

# Thread stacks and allocator arenas are address space too: the cap leaves this much above the budget.
_AS_HEADROOM = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


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

    def settle_for_timing(self) -> None:
        """From now on allocate as glibc does in a long-running PyTorch process: blocks up to 32 MiB come back
        from the heap, larger ones are fresh mappings each time, returned at once when freed. (Defaults that glibc
        adjusts at run time: its mmap threshold rises to the largest freed mapping, up to 32 MiB, and the trim
        threshold to twice that.) So a timed pass pays, like a training step on default PyTorch, for the kernel
        mapping and zeroing the pages of its large outputs; page_faults_per_pass in each row says how many.
        A heap that kept everything instead would grow with fragmentation (twice the live set seen at 2^19
        tokens) past the budget the passes before were held to. Same for every method."""
        _mallopt((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 64 * 2**20))
        # Whether the point fits its budget was settled under the strict cap; a heap of reused blocks fragments,
        # so the timed passes get a quarter of the budget more address space (not memory: mappings return).
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_AS, (soft + self.budget // 4, hard))

    def faults(self) -> int | None:
        """Minor page faults of this process so far: first touches of fresh memory."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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

    def settle_for_timing(self) -> None:
        pass  # the CUDA caching allocator reuses memory, as in any PyTorch process on a GPU

    def faults(self) -> int | None:
        return None  # device memory has no page faults to count


def for_device(device: str, budget: int):
    return CudaMemory(budget) if device == "cuda" else CpuMemory(budget)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
