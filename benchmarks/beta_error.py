"""How far `race` is from exact angular attention (gamma = P) as beta and L move, on clustered inputs.

    python benchmarks/beta_error.py            # prints a markdown table (docs/choosing-beta.md quotes it)

Error = ||race - angular|| / ||angular - mean(v)||: the estimate's error relative to how far exact attention
moves away from uniform averaging (the signal). Inputs: B=1, H=4, T=1024, D=128, q and k drawn around 16
shared cluster centres (unit-variance centres, noise 0.5), v standard normal; P = 3; mean over 3 seeds.
Twice: as drawn (|q|, |k| about 12), and scaled to unit length.
"""

from __future__ import annotations

import torch

from racebench import make_planes, race_attention
from racebench.methods.angular import angular_attention

BETAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
LS = (3, 16, 64, 256)
P, T, D, H = 3, 1024, 128, 4


def clustered(gen, centres):
    idx = torch.randint(len(centres), (H, T), generator=gen)
    return (centres[idx] + 0.5 * torch.randn(H, T, D, generator=gen, dtype=torch.float64))[None]


def error(beta: float, L: int, seed: int, unit: bool) -> float:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, D, generator=gen, dtype=torch.float64)
    q, k = clustered(gen, centres), clustered(gen, centres)
    if unit:  # same directions, unit length: tanh(W x) no longer saturates
        q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(1, H, T, D, generator=gen, dtype=torch.float64)
    exact = angular_attention(q, k, v, gamma=P, eps=0)
    est = race_attention(q, k, v, make_planes(L, P, D, seed=seed + 1000).double(), beta=beta, eps=0)
    return ((est - exact).norm() / (exact - v.mean(-2, keepdim=True)).norm()).item()


def main() -> None:
    head = " | ".join(f"{kind} L={L}" for kind in ("raw", "unit") for L in LS)
    print(f"| beta | {head} |")
    print("|---|" + "---|" * (2 * len(LS)))
    for beta in BETAS:
        cells = [sum(error(beta, L, s, unit) for s in range(3)) / 3 for unit in (False, True) for L in LS]
        print(f"| {beta:g} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
