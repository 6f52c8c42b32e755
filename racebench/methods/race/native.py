"""`race` on the CPU through native kernels (csrc/race_cpu.cpp): twins of lean.py's four non-causal per-head
functions, same signatures, so lean's autograd Function runs either set. They go through tiles of 32 tokens whose
products are register-blocked on whole SIMD vectors (head dimensions 64 and 128; plain loops otherwise), instead of
[S, block] temporaries passing between PyTorch operators.

Built on first use with the machine's C++ compiler (torch.utils.cpp_extension, cached under
~/.cache/racebench/race_cpu-<hash of source, flags and torch version>, or $RACEBENCH_CACHE; a sweep builds them
before its first point); where they cannot be built,
`build_error()` says why and `race` runs the PyTorch core.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from racebench.methods.race.implementations import native_limits
from racebench.methods.registry import dtype_name

_SOURCE = Path(__file__).parent / "csrc" / "race_cpu.cpp"


# -ffast-math lets tanh and exp run in SIMD lanes (glibc's vector math); it is not passed to the link, so it does not
# switch the whole process to flushing denormals.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-funroll-loops"]


def _build_dir() -> tuple[str, Path]:
    """A build folder of its own per source text, flags and torch version, holding a copy of the source: checkouts
    at other paths with the same source share one build, and a changed source never rebuilds another's."""
    import torch

    text = _SOURCE.read_bytes()
    key = hashlib.sha256(text + " ".join(_FLAGS).encode() + torch.__version__.encode()).hexdigest()[:16]
    root = Path(os.environ.get("RACEBENCH_CACHE") or Path.home() / ".cache" / "racebench")
    folder = root / f"race_cpu-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / _SOURCE.name
    if not source.exists() or source.read_bytes() != text:
        tmp = folder / f".{_SOURCE.name}.{os.getpid()}"
        tmp.write_bytes(text)
        os.replace(tmp, source)
    return f"racebench_race_cpu_{key}", folder


@functools.cache
def _build():
    """(module, None) or (None, why not)."""
    try:
        from torch.utils.cpp_extension import load

        name, folder = _build_dir()
        module = load(name=name, sources=[str(folder / _SOURCE.name)], build_directory=str(folder),
                      extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
        return module, None
    except Exception as exc:  # no compiler, no ninja, a failed build: the PyTorch core serves instead
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


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
