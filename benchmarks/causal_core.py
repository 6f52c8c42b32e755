"""race's causal PyTorch core at training shapes: heads grouped per call (the default: 4096 // T heads at once)
against one head per call (block = T), side by side in one process, fwd+bwd, median of --repeats.

    python benchmarks/causal_core.py [--shapes 32x1x128x64,32x1x256x64,1x4x4096x128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from racebench.methods.race.hashing import make_planes
from racebench.methods.race.lean import race_lean


def step_ms(q, k, v, planes, block, repeats):
    times = []
    for _ in range(repeats + 2):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        race_lean(q, k, v, planes, beta=8.0, causal=True, block=block).sum().backward()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[2:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x1x128x64,32x1x256x64,1x4x4096x128", help="BxHxTxD, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    a = parser.parse_args(argv)
    print("| B x H x T x D | one head per call | grouped | ratio |\n|---|---|---|---|")
    for shape in a.shapes.split(","):
        B, H, T, D = map(int, shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, generator=gen).requires_grad_() for _ in range(3))
        planes = make_planes(3, 3, D, seed=0)
        single, grouped = step_ms(q, k, v, planes, T, a.repeats), step_ms(q, k, v, planes, None, a.repeats)
        print(f"| {shape} | {single:.1f} ms | {grouped:.1f} ms | {single / grouped:.2f}x |")


if __name__ == "__main__":
    main()
