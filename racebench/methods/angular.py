"""Exact sharpened angular attention (RACE.md): the kernel RACE estimates, in O(T^2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from racebench.methods.registry import BuildConfig, Method, register_method

# Keeps acos's derivative finite at cos = +-1 (parallel vectors) without visibly changing the kernel.
_COS_LIMIT = 1 - 1e-6


def angular_attention(q, k, v, *, gamma=8.0, causal=False, eps=1e-6):
    """o_i = sum_j sim(q_i, k_j) v_j / sum_j sim(q_i, k_j), sim = (1 - theta / pi) ** gamma."""
    cos = F.normalize(q, dim=-1, eps=eps) @ F.normalize(k, dim=-1, eps=eps).transpose(-1, -2)
    sim = (1 - torch.acos(cos.clamp(-_COS_LIMIT, _COS_LIMIT)) / math.pi) ** gamma  # [B, H, T, T]
    if causal:
        T = q.shape[-2]
        sim = sim * torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return (sim @ v) / (sim.sum(-1, keepdim=True) + eps)


def _build(cfg: BuildConfig):
    gamma = cfg.knob("angular_gamma", 8.0)
    return lambda q, k, v: angular_attention(q, k, v, gamma=gamma, causal=cfg.causal)


register_method(Method(
    name="angular",
    description="Exact sharpened angular attention (1 - theta/pi)^gamma, gamma = 8 by default; O(T^2)",
    build=_build,
    knobs=("angular_gamma",),
))
