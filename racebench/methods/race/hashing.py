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


def _bucket_probs(u: torch.Tensor, beta: float) -> torch.Tensor:
    """softmax_r(beta * <u, c_r>) over the corners, as the product over bits of sigmoid(2 beta c_rp u_p).

    The softmax of a linear function of the corners factorizes over bits, exactly; the product form avoids
    a softmax over a tiny last dimension (slow on CPU) and is stable for any beta. u: [..., P] -> [..., 2**P].
    """
    # Both signs from sigmoid itself: 1 - sigmoid(z) would lose all precision where sigmoid(z) ~ 1.
    s = torch.sigmoid(torch.stack((-2 * beta * u, 2 * beta * u), dim=-1))  # [..., P, 2]
    f = s[..., 0, :]
    for p in range(1, u.shape[-1]):  # bit p is the next most significant; c_p = -1 takes sigmoid(-z)
        f = (f.unsqueeze(-1) * s[..., p, :].unsqueeze(-2)).flatten(-2)
    return f


def soft_hash(x: torch.Tensor, planes: torch.Tensor, beta: float) -> torch.Tensor:
    """phi(x): [..., D] -> [..., L * 2**P], computed in x's dtype, differentiable by autograd."""
    L, P, D = planes.shape
    w = planes.reshape(L * P, D).t().to(x.dtype)
    # A batched weight lets matmul read strided blocks of x in place instead of copying them.
    u = torch.tanh(x @ (w.unsqueeze(0) if x.dim() == 3 else w)).unflatten(-1, (L, P))  # [..., L, P]
    return _bucket_probs(u, beta).flatten(-2)


def soft_hash_vjp(x: torch.Tensor, planes: torch.Tensor, beta: float, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of <phi(x), grad> with respect to x, recomputing phi instead of saving it.

    Runs in grad's dtype (fp32 for low-precision inputs); x is cast per call, so callers pass blocks.
    """
    L, P, D = planes.shape
    w = planes.reshape(L * P, D).to(grad.dtype)
    c = corners(P, device=x.device, dtype=grad.dtype)
    wt = w.t().unsqueeze(0) if x.dim() == 3 else w.t()
    u = torch.tanh(x.to(grad.dtype) @ wt).unflatten(-1, (L, P))  # [..., L, P]
    f = _bucket_probs(u, beta)  # [..., L, R]
    g = grad.unflatten(-1, (L, 2**P))
    dlogits = f * (g - (f * g).sum(-1, keepdim=True))  # softmax backward
    du = beta * (dlogits @ c)  # [..., L, P]
    return ((1 - u * u) * du).flatten(-2) @ w  # tanh backward, then the projection
