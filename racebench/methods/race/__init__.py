"""RACE attention: the public functional API and the `race` / `race-paper` methods."""

from __future__ import annotations

import math
import os

import torch

from racebench.errors import UsageError
from racebench.methods.race import native
from racebench.methods.race.hashing import make_planes, soft_hash
from racebench.methods.race.lean import race_lean
from racebench.methods.race.paper import paper_beta, race_paper
from racebench.methods.registry import ALL, HAS_TRITON, BuildConfig, Method, register_method

DEFAULT_P = 3
DEFAULT_L = 3
# Inverse temperature of the soft hash. See README "Choosing beta": at 8 the soft hash is within a few
# percent of the hard SimHash on unnormalized inputs, so `race` estimates angular attention with gamma = P.
DEFAULT_BETA = 8.0
NORMALIZATIONS = ("paper", "bucket")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels take
IMPLS = ("auto", "triton", "cpp", "torch")

__all__ = ["race_attention", "make_planes", "soft_hash", "DEFAULT_BETA", "DEFAULT_P", "DEFAULT_L"]


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
    PyTorch core), "torch" = the PyTorch core (lean.py), "auto" = triton for CUDA inputs the kernels take
    (fp32/bf16/fp16, S <= 64, D <= 256) when Triton is installed, cpp for non-causal CPU inputs its kernels
    take where they build, else torch.
    """
    _validate(q, k, v, planes, beta, normalize)
    if impl not in IMPLS:
        raise UsageError(f"impl must be one of {', '.join(IMPLS)}, not {impl!r}")
    if impl == "auto":  # picks only what can run these inputs
        if q.is_cuda:
            impl = "triton" if HAS_TRITON and _fused().unsupported_reason(q, planes) is None else "torch"
        else:  # the native kernels are the non-causal core (as the registry's choice, _race_impl)
            impl = "cpp" if not causal and native.unsupported_reason(q, planes) is None else "torch"
    elif impl == "cpp" and (why := native.unsupported_reason(q, planes)) is not None:
        raise UsageError(f"impl='cpp': {why}")
    if impl == "triton":
        if not HAS_TRITON:
            raise UsageError("impl='triton' needs the triton package (pip install triton)")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("impl='triton' runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1)")
        return _fused().race_fused(q, k, v, planes, beta=beta, causal=causal, normalize=normalize, eps=eps)
    if impl == "cpp":
        return race_lean(q, k, v, planes, beta=beta, causal=causal, normalize=normalize, eps=eps, ops=native)
    return race_lean(q, k, v, planes, beta=beta, causal=causal, normalize=normalize, eps=eps)


def _fused():
    from racebench.methods.race import fused  # imports triton: only when the kernels are wanted

    return fused


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


def _knobs(cfg: BuildConfig):
    return cfg.knob("race_P", DEFAULT_P), cfg.knob("race_L", DEFAULT_L), cfg.knob("race_M", 1)


def _race_knobs(cfg: BuildConfig) -> dict:
    P, L, M = _knobs(cfg)
    return dict(race_P=P, race_L=L, race_M=M, race_beta=float(cfg.knob("race_beta", DEFAULT_BETA)),
                race_normalize=cfg.knob("race_normalize", "paper"))


def _race_paper_knobs(cfg: BuildConfig) -> dict:
    P, L, M = _knobs(cfg)
    return dict(race_P=P, race_L=L, race_M=M, race_beta=float(cfg.knob("race_beta", paper_beta(cfg.causal, cfg.D))),
                race_normalize="bucket")


def _build_race(cfg: BuildConfig, impl: str):
    P, L, M = _knobs(cfg)
    beta, normalize = cfg.knob("race_beta", DEFAULT_BETA), cfg.knob("race_normalize", "paper")
    planes = make_planes(L, P, cfg.D, seed=cfg.seed, M=M).to(cfg.device)

    def race(q, k, v):
        outs = [race_attention(q, k, v, planes[m], beta=beta, causal=cfg.causal, normalize=normalize, impl=impl)
                for m in range(M)]
        return outs[0] if M == 1 else torch.stack(outs).mean(0)

    return race


def _build_race_paper(cfg: BuildConfig):
    P, L, M = _knobs(cfg)
    beta = cfg.knob("race_beta", paper_beta(cfg.causal, cfg.D))
    planes = make_planes(L, P, cfg.D, seed=cfg.seed, M=M).to(cfg.device)
    return lambda q, k, v: race_paper(q, k, v, planes, beta=beta, causal=cfg.causal)


RACE_KNOBS = ("race_P", "race_L", "race_beta", "race_M", "race_normalize")


def _race_impl(cfg: BuildConfig) -> str:
    if cfg.device == "cuda":
        return "triton" if HAS_TRITON else "torch"
    P, L, _ = _knobs(cfg)
    return "cpp" if not cfg.causal and native.supports(cfg.dtype, L, P) and native.available() else "torch"


def _prepare_race(device: str) -> None:
    if device == "cpu":
        native.available()  # builds the native kernels once, in the sweep's process, outside every point's budget


register_method(Method(
    name="race",
    description="RACE attention: fused Triton kernels on CUDA, native kernels on CPU (non-causal), else the "
                "PyTorch core (race-torch)",
    build=lambda cfg: _build_race(cfg, _race_impl(cfg)),
    prepare=_prepare_race,
    # The kernels take fp32/bf16/fp16; on CUDA without Triton race is race-torch and takes every dtype.
    support={"cpu": ALL, "cuda": FUSED_DTYPES if HAS_TRITON else ALL},
    impl=_race_impl,
    knobs=RACE_KNOBS,
    effective_knobs=_race_knobs,
))
register_method(Method(
    name="race-torch",
    description="RACE attention: soft-LSH features + blocked PyTorch linear-attention core, recomputing backward",
    build=lambda cfg: _build_race(cfg, "torch"),
    knobs=RACE_KNOBS,
    effective_knobs=_race_knobs,
))
register_method(Method(
    name="race-paper",
    description="RACE as the published benchmark scripts compute it (bucket normalization, [T,S,D] causal)",
    build=_build_race_paper,
    knobs=("race_P", "race_L", "race_beta", "race_M"),
    effective_knobs=_race_paper_knobs,
))
