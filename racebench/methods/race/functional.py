"""race_attention: the public functional form of RACE, on any of its implementations."""

from __future__ import annotations

import math
import os

import torch

from racebench.errors import UsageError
from racebench.methods.race import implementations, native
from racebench.methods.race.lean import race_lean
from racebench.methods.registry import HAS_TRITON, dtype_name

NORMALIZATIONS = ("paper", "bucket")
IMPLS = ("auto", "triton", "cpp", "torch")


def race_attention(q, k, v, planes, *, beta, causal=False, normalize="paper", eps=1e-6, impl="auto"):
    """RACE attention (RACE.md): a soft-LSH estimate of sharpened angular attention, linear in T.

    q, k, v: [B, H, T, D]; planes: [L, P, D] Gaussian hyperplanes (see `make_planes`); beta > 0 the soft
    hash's inverse temperature. With phi the S = L * 2**P soft-hash features, A = sum_j phi(k_j) and
    KV = sum_j phi(k_j) v_j^T (prefix sums over j <= t when causal):
      normalize="paper":  o_i = phi(q_i)^T KV / (phi(q_i)^T A + eps)
      normalize="bucket": o_i = sum_s phi(q_i)_s KV_s / (A_s + eps)
    Returns [B, H, T, D] in q's dtype, differentiable in q, k and v; accumulates in fp32 (fp64 for fp64).
    Memory beyond q, k, v, o and their gradients is O(block * (S + D)), never [T, S, D].
    impl: "triton" = the fused kernels (fused.py; CUDA, or the CPU under TRITON_INTERPRET=1), "cpp" = the
    native CPU kernels for the non-causal core (native.py; fp32/fp64, built on first use; causal inputs run the
    PyTorch core), "torch" = the PyTorch core (lean.py), "auto" = what implementations.choose picks (the `race`
    method's chooser): triton for CUDA inputs the kernels take (fp32/bf16/fp16, S <= 64, D <= 256), cpp for
    non-causal CPU inputs its kernels take where they build, else torch.
    """
    _validate(q, k, v, planes, beta, normalize)
    impl = resolve_impl(q, planes, causal, impl)
    if impl == "triton":
        if not HAS_TRITON:
            raise UsageError("impl='triton' needs the triton package (pip install triton)")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("impl='triton' runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1)")
        from racebench.methods.race import fused  # imports triton: only when the kernels are wanted

        return fused.race_fused(q, k, v, planes, beta=beta, causal=causal, normalize=normalize, eps=eps)
    if impl == "cpp":
        return race_lean(q, k, v, planes, beta=beta, causal=causal, normalize=normalize, eps=eps, ops=native)
    return race_lean(q, k, v, planes, beta=beta, causal=causal, normalize=normalize, eps=eps)


def resolve_impl(q, planes, causal, impl):
    """The implementation that impl ("auto" or a name) runs for these inputs; UsageError for an unknown name."""
    if impl not in IMPLS:
        raise UsageError(f"impl must be one of {', '.join(IMPLS)}, not {impl!r}")
    if impl == "auto":  # picks only what can run these inputs
        L, P, D = planes.shape
        impl, _ = implementations.choose(q.device.type, dtype_name(q.dtype), causal, D, L, P)
    elif impl == "cpp" and (why := native.unsupported_reason(q, planes)) is not None:
        raise UsageError(f"impl='cpp': {why}")
    return impl


def _validate(q, k, v, planes, beta, normalize):
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v, planes)):
        raise UsageError("q, k, v and planes must be torch tensors")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise UsageError(f"q, k, v must share one shape [B, H, T, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise UsageError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise UsageError("q, k, v must be on one device")
    if planes.dim() != 3 or planes.shape[-1] != q.shape[-1]:
        raise UsageError(f"planes must be [L, P, D] with D = {q.shape[-1]}; got {tuple(planes.shape)}")
    if planes.shape[1] > 12:
        raise UsageError(f"P = {planes.shape[1]} gives 2**P buckets per table; use P <= 12")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise UsageError(f"beta must be a positive finite number, not {beta!r}")
    if normalize not in NORMALIZATIONS:
        raise UsageError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, not {normalize!r}")
