"""`race` on the CPU through native kernels (csrc/race_cpu.cpp): twins of lean.py's four non-causal per-head
functions, same signatures, so lean's autograd Function runs either set. Each token's features stay in registers
and cache instead of passing through [S, block] temporaries between PyTorch operators.

Built on first use with the machine's C++ compiler (torch.utils.cpp_extension, cached under
~/.cache/torch_extensions); where it cannot be built, `available()` says why and `race` runs the PyTorch core.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DTYPES = (torch.float32, torch.float64)
_SOURCE = Path(__file__).parent / "csrc" / "race_cpu.cpp"


@functools.cache
def _build():
    """(module, None) or (None, why not)."""
    try:
        from torch.utils.cpp_extension import load

        module = load(name="racebench_race_cpu", sources=[str(_SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", "-funroll-loops"], extra_ldflags=["-fopenmp"],
                      verbose=False)
        return module, None
    except Exception as exc:  # no compiler, no ninja, a failed build: the PyTorch core serves instead
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def available() -> bool:
    return _build()[0] is not None


def unavailable_reason() -> str | None:
    return _build()[1]


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
