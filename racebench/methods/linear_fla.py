"""linear-fla: the `linear` method's attention (elu+1 features, Katharopoulos et al. 2020) through
flash-linear-attention's Triton kernels (fla-core's fla.ops.linear_attn.chunk_linear_attn), the GPU peer from a
well-kept library. Causal only (the kernel's form); used where `fla` is importable. fla's kernels do not run on
Triton's CPU interpreter, so the tests check this adapter with fla's own naive function in the kernel's place.

A machine that cannot install packages gets fla as a folder on PYTHONPATH (docs/methods.md):
    pip install --no-deps --target .gpu-deps fla-core einops
"""

from __future__ import annotations

import importlib.util

from racebench.methods.linear import elu_features, quadratic_attention
from racebench.methods.registry import Method, register_method

HAS_FLA = importlib.util.find_spec("fla") is not None
FLA_EPS = 1e-10  # fla adds it to the scaled denominator: q.k / sqrt(D) summed over keys


def fla_linear_attention(q, k, v, *, kernel=None):
    """Causal elu+1 linear attention on [B, H, T, D]: o_t = sum_j<=t phi(q_t).phi(k_j) v_j / sum_j<=t phi(q_t).phi(k_j)
    through `kernel` (default fla's chunk_linear_attn; any function of its signature and [B, T, H, D] layout)."""
    if kernel is None:
        from fla.ops.linear_attn import chunk_linear_attn as kernel
    fq, fk = (elu_features(x).transpose(1, 2) for x in (q, k))
    o, _ = kernel(fq, fk, v.transpose(1, 2), normalize=True)
    return o.transpose(1, 2)


def fla_reference(q, k, v):
    """What fla computes, written as the T x T form of linear attention (its epsilon moved out of the scale)."""
    return quadratic_attention(elu_features(q), elu_features(k), v, causal=True, eps=FLA_EPS * q.shape[-1] ** 0.5)


def _unavailable(device: str) -> str | None:
    return None if HAS_FLA else "fla-core not installed (pip install fla-core)"


register_method(Method(
    name="linear-fla",
    description="linear's elu+1 attention through flash-linear-attention's chunked Triton kernel (fla-core), causal",
    build=lambda cfg: fla_linear_attention,
    reference=lambda cfg: fla_reference,
    devices={"cuda": ("fp32", "bf16", "fp16")},
    noncausal=False,
    unavailable=_unavailable,
    impl=lambda cfg: "fla.ops.linear_attn.chunk_linear_attn",
    color="salmon",
    marker="d",
    family="linear",
))
