"""Soft locality-sensitive hashing: the feature map phi of RACE (RACE.md, "The estimator").

phi_l(x)_r = softmax_r(beta * <tanh(W_l x), c_r>) over the R = 2**P corners c_r of {-1,+1}^P;
phi(x) concatenates the L tables into S = L * R non-negative features.
"""

from __future__ import annotations

import torch


def make_planes(L: int, P: int, D: int, *, seed: int = 0, M: int | None = None) -> torch.Tensor:
    """Gaussian hyperplanes [L, P, D] (or [M, L, P, D]), drawn on the CPU so a seed means the same planes
    on every device."""
    shape = (L, P, D) if M is None else (M, L, P, D)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def corners(P: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The 2**P corners of {-1,+1}^P as rows [R, P], in itertools.product([-1, 1], repeat=P) order."""
    bits = (torch.arange(2**P, device=device)[:, None] >> torch.arange(P - 1, -1, -1, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def soft_hash(x: torch.Tensor, planes: torch.Tensor, beta: float) -> torch.Tensor:
    """phi(x): [..., D] -> [..., L * 2**P], computed in x's dtype, differentiable by autograd."""
    L, P, D = planes.shape
    u = torch.tanh(x @ planes.reshape(L * P, D).t().to(x.dtype)).unflatten(-1, (L, P))  # [..., L, P]
    logits = beta * (u @ corners(P, device=x.device, dtype=x.dtype).t())  # [..., L, R]
    return torch.softmax(logits, dim=-1).flatten(-2)


def soft_hash_vjp(x: torch.Tensor, planes: torch.Tensor, beta: float, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of <phi(x), grad> with respect to x, recomputing phi instead of saving it.

    Runs in grad's dtype (fp32 for low-precision inputs); x is cast per call, so callers pass blocks.
    """
    L, P, D = planes.shape
    w = planes.reshape(L * P, D).to(grad.dtype)
    c = corners(P, device=x.device, dtype=grad.dtype)
    u = torch.tanh(x.to(grad.dtype) @ w.t()).unflatten(-1, (L, P))  # [..., L, P]
    f = torch.softmax(beta * (u @ c.t()), dim=-1)  # [..., L, R]
    g = grad.unflatten(-1, (L, 2**P))
    dlogits = f * (g - (f * g).sum(-1, keepdim=True))  # softmax backward
    du = beta * (dlogits @ c)  # [..., L, P]
    return ((1 - u * u) * du).flatten(-2) @ w  # tanh backward, then the projection
