"""`race` on the CPU through native kernels (csrc/race_cpu.cpp): twins of lean.py's four non-causal per-head
functions, same signatures, so lean's autograd Function runs either set. They go through tiles of 32 tokens whose
products are register-blocked on whole SIMD vectors (head dimensions 64 and 128; plain loops otherwise), instead of
[S, block] temporaries passing between PyTorch operators.

Built once with the machine's C++ compiler (torch.utils.cpp_extension) into a folder of its own under
~/.cache/racebench (or $RACEBENCH_CACHE), keyed by a hash of the source, flags, compiler, CPU vectors, torch and
Python: a sweep builds them in its own process before its first point, and every later process imports the built
library directly (no ninja, so no rebuild because another checkout or another ninja built it). One process compiles
at a time (an OS lock, released if the builder dies: no stale lock); a process with RACEBENCH_NO_BUILD set (a
sweep's point) never compiles. Where they cannot be built, `build_error()` says why and `race` runs the PyTorch
core.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from racebench import locks
from racebench.methods.race.implementations import native_limits
from racebench.methods.registry import NO_BUILD_ENV, dtype_name

_SOURCE = Path(__file__).parent / "csrc" / "race_cpu.cpp"
log = logging.getLogger("racebench")

# -ffast-math lets tanh and exp run in SIMD lanes (glibc's vector math); it is not passed to the link, so it does not
# switch the whole process to flushing denormals.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-funroll-loops"]
BUILD_WAIT_S = 600.0  # how long to wait for another process's build before giving up
_DONE = "build.json"  # written after a successful build: the folder holds a complete library


@functools.cache
def compiler() -> dict:
    """The C++ compiler torch's loader uses ($CXX or c++): its path and version line; path None when absent."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    version = None
    if path:
        try:
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
            version = (version.splitlines() or [""])[0].strip()
        except (OSError, subprocess.TimeoutExpired):
            path = None
    return {"command": name, "path": path, "version": version}


@functools.cache
def simd() -> str:
    """The widest vector extension this CPU has of those the kernels size their vectors by (race_cpu.cpp, VBYTES):
    'avx512f', 'avx2' or 'none' (the machine's architecture where /proc/cpuinfo is absent). -march=native builds for
    it, so it is part of a build's key: a build made where AVX-512 runs would not run here, and a build made
    without it would run slowly where it does."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return platform.machine()
    return next((f for f in ("avx512f", "avx2") if f in flags), "none")


def _build_dir() -> tuple[str, Path]:
    """The build folder for this source, flags, compiler, CPU vectors, torch and Python, holding a copy of the
    source."""
    import torch

    text = _SOURCE.read_bytes()
    parts = [text, " ".join(_FLAGS), json.dumps(compiler(), sort_keys=True), simd(), torch.__version__,
             str(Path(torch.__file__).resolve().parent), sys.version]
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)).hexdigest()[:16]
    root = Path(os.environ.get("RACEBENCH_CACHE") or Path.home() / ".cache" / "racebench")
    folder = root / f"race_cpu-{key}"
    return f"racebench_race_cpu_{key}", folder


def _import(name: str, folder: Path):
    """The built library, imported as a Python module (what torch's loader does after building)."""
    import torch  # noqa: F401  (the library links against torch's, loaded first)

    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(name: str, folder: Path):
    """Build under the folder's lock; a process that waited for another's build imports that one."""
    folder.mkdir(parents=True, exist_ok=True)
    waiting = lambda pid: log.info(f"waiting for race's CPU kernels, being built by pid {pid}")  # noqa: E731
    with locks.exclusive(folder / "racebench.lock", wait_s=BUILD_WAIT_S, on_wait=waiting):
        if (folder / _DONE).exists():
            try:
                return _import(name, folder)
            except ImportError as exc:  # a library deleted or cut short since: build it again
                log.warning(f"race's CPU kernels in {folder} cannot be imported ({exc}): building them again")
                (folder / _DONE).unlink()
        from torch.utils.cpp_extension import load

        # torch's own lock file: every builder holds racebench.lock first, so one found here was left by a killed
        # build, and would make torch's loader wait for ever.
        (folder / "lock").unlink(missing_ok=True)
        source = folder / _SOURCE.name
        source.write_bytes(_SOURCE.read_bytes())
        log.info("building race's CPU kernels, once per source and compiler: about a minute")
        start = time.monotonic()
        module = load(name=name, sources=[str(source)], build_directory=str(folder), extra_cflags=_FLAGS,
                      extra_ldflags=["-fopenmp"], verbose=False)
        info = {"compiler": compiler(), "flags": _FLAGS, "seconds": round(time.monotonic() - start, 1)}
        (folder / _DONE).write_text(json.dumps(info, indent=2) + "\n")
        return module


@functools.cache
def _build():
    """(module, None) or (None, why not)."""
    try:
        name, folder = _build_dir()
        if (folder / _DONE).exists():
            with contextlib.suppress(ImportError):
                return _import(name, folder), None
        if os.environ.get(NO_BUILD_ENV):
            return None, "not built, and this process may not compile them (a sweep builds them before its points)"
        if compiler()["path"] is None:
            return None, f"no C++ compiler ({compiler()['command']}) to build them"
        return _compile(name, folder), None
    except locks.LockHeld as exc:
        return None, f"pid {exc.holder} has been building them for over {BUILD_WAIT_S:g} s ({exc.path})"
    except Exception as exc:  # no ninja, a failed build: the PyTorch core serves instead
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def state() -> str:
    """Without building: 'built', 'not built yet: ...' or 'cannot be built: why' (for `racebench methods`)."""
    try:
        name, folder = _build_dir()
    except Exception as exc:
        return f"cannot be built: {type(exc).__name__}: {exc}".splitlines()[0]
    if (folder / _DONE).exists():
        return "built"
    if compiler()["path"] is None:
        return f"cannot be built: no C++ compiler ({compiler()['command']})"
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        return "cannot be built: no ninja"
    return "not built yet: the first sweep that runs race on the CPU builds them (about a minute)"


def build_info() -> dict:
    """What run.json records of the kernels: where and how they were built, or why not."""
    name, folder = _build_dir()
    done = folder / _DONE
    info = json.loads(done.read_text()) if done.exists() else {"compiler": compiler(), "flags": _FLAGS}
    return info | {"simd": simd(), "folder": str(folder), "state": state()}


def available() -> bool:
    return _build()[0] is not None


def build_error() -> str | None:
    return _build()[1]


def unsupported_reason(q, planes) -> str | None:
    """None when the kernels take these inputs (building them on first use), else why not."""
    L, P, _ = planes.shape
    if q.device.type != "cpu":
        return f"the native kernels take CPU tensors, not {q.device.type}"
    return native_limits(dtype_name(q.dtype), L, P) or build_error()


def _hash_args(cfg):
    h = cfg.hash
    return h.W, h.L, h.P, float(h.beta)


def key_state(k, v, cfg):
    A, KV = _build()[0].key_state(k, v, *_hash_args(cfg))
    return A, KV


def query_forward(q, A, KV, o, cfg):
    _build()[0].query_forward(q, A, KV, o, cfg.normalize == "paper", cfg.eps, *_hash_args(cfg))


def query_backward(q, do, A, KV, dq, cfg):
    dA, dKV = _build()[0].query_backward(q, do, A, KV, dq, cfg.normalize == "paper", cfg.eps, *_hash_args(cfg))
    return dA, dKV


def key_backward(k, v, dA, dKV, dk, dv, cfg, accumulate=False):
    _build()[0].key_backward(k, v, dA, dKV, dk, dv, accumulate, *_hash_args(cfg))


def decode_step(q, k, v, A, KV, o, W, L, P, beta, normalize, eps):
    """One decoded token for every head: rows of q, k, v, o [N, D]; the state A [N, S], KV [N, S, D] in place."""
    _build()[0].decode_step(q, k, v, A, KV, o, normalize == "paper", eps, W, L, P, float(beta))
