"""Exact sharpened angular attention (RACE.md): the kernel RACE estimates, in O(T^2)."""

from __future__ import annotations

import math

from racebench.methods.registry import BuildConfig, Knob, Method, register_method

# Keeps acos's derivative finite at cos = +-1 (parallel vectors) without visibly changing the kernel.
_COS_LIMIT = 1 - 1e-6


def angular_attention(q, k, v, *, gamma=8.0, causal=False, eps=1e-6):
    """o_i = sum_j sim(q_i, k_j) v_j / sum_j sim(q_i, k_j), sim = (1 - theta / pi) ** gamma."""
    import torch
    import torch.nn.functional as F

    cos = F.normalize(q, dim=-1, eps=eps) @ F.normalize(k, dim=-1, eps=eps).transpose(-1, -2)
    sim = (1 - torch.acos(cos.clamp(-_COS_LIMIT, _COS_LIMIT)) / math.pi) ** gamma  # [B, H, T, T]
    if causal:
        T = q.shape[-2]
        sim = sim * torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return (sim @ v) / (sim.sum(-1, keepdim=True) + eps)


def angular_reference(q, k, v, *, gamma=8.0, causal=False, eps=1e-6):
    """Row by row, straight from RACE.md."""
    import torch

    rows = []
    for t in range(q.shape[-2]):
        stop = t + 1 if causal else q.shape[-2]
        cos = torch.einsum("bhd,bhjd->bhj", q[..., t, :], k[..., :stop, :])
        cos = cos / (q[..., t, :].norm(dim=-1, keepdim=True) * k[..., :stop, :].norm(dim=-1))
        sim = (1 - torch.acos(cos.clamp(-_COS_LIMIT, _COS_LIMIT)) / math.pi) ** gamma
        rows.append(torch.einsum("bhj,bhjd->bhd", sim, v[..., :stop, :]) / (sim.sum(-1, keepdim=True) + eps))
    return torch.stack(rows, -2)


GAMMA = Knob("angular_gamma", float, 8.0, "angular: sharpness gamma of (1 - theta/pi)^gamma.", min=0.0, max=1e3)


def _build(cfg: BuildConfig, fn=angular_attention):
    gamma = angular.effective_knobs(cfg)["angular_gamma"]
    return lambda q, k, v: fn(q, k, v, gamma=gamma, causal=cfg.causal)


angular = register_method(Method(
    name="angular",
    description="Exact sharpened angular attention (1 - theta/pi)^gamma, gamma = 8 by default; O(T^2)",
    build=_build,
    reference=lambda cfg: _build(cfg, angular_reference),
    knobs=(GAMMA,),
    color="tab:pink",
    marker="p",
    family="angular",
    presets=frozenset({"default", "paper", "fidelity"}),
))
