"""The machine and software a run measured on: everything run.json records."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import psutil
import torch

import racebench
from racebench.methods.registry import list_methods
from racebench.results.schema import SCHEMA_VERSION


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(racebench.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _commit() -> tuple[str | None, bool | None]:
    """(git commit, whether the checkout has uncommitted changes): from the checkout racebench runs from, else
    the commit written into the package when it was built (setup.py), for a non-editable install."""
    sha = _git("rev-parse", "HEAD")
    if sha:
        return sha, bool(_git("status", "--porcelain", "--untracked-files=no"))
    built = Path(racebench.__file__).parent / "build_commit.txt"
    return (built.read_text().strip() or None, None) if built.is_file() else (None, None)


def _gpu_driver() -> str | None:
    """The NVIDIA kernel driver's version (e.g. 550.54.15), None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    words = text.split()
    return next((w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit()), None)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ([madvise] of 'always [madvise] never'), None off Linux."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return next((w.strip("[]") for w in text.split() if w.startswith("[")), text.strip())


def collect_environment() -> dict:
    sha, dirty = _commit()
    env = {
        "schema_version": SCHEMA_VERSION,
        "racebench_version": racebench.__version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "pandas": _version("pandas"),
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "gpu": None,
        "gpu_memory_bytes": None,
        "gpu_driver": _gpu_driver(),
        "cpu": _cpu_model(),
        "cpu_cores": psutil.cpu_count(logical=True),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "utc_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # Huge pages change CPU times a lot: fresh memory is mapped and zeroed 2 MiB at a time instead of 4 KiB.
        "transparent_hugepage": _thp_mode(),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        # A preloaded allocator (jemalloc, tcmalloc) reuses what glibc maps fresh: CPU times of large passes move.
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "malloc_conf": os.environ.get("MALLOC_CONF"),
    }
    for method in list_methods():  # what each method records of its set-up (race: its kernels' launch options)
        if method.environment is not None:
            env |= method.environment()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"], env["gpu_memory_bytes"] = props.name, props.total_memory
    return env
