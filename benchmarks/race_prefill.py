"""race's prefill on the CPU: the state taken from the causal core's own pass (what the decode modes run) against
the core's outputs followed by a second pass that hashes the prompt's keys again to sum the state (what the Triton
kernels and autograd still need), side by side in one process; B=1, H=4, D=128, P=L=3, fp32, median of --repeats.

    python benchmarks/race_prefill.py [--lengths 2^14,2^16,2^18]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from racebench.bench.units import parse_lengths
from racebench.methods.race.generate import race_prefill
from racebench.methods.race.hashing import make_planes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2^14,2^16,2^18")
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args(argv)
    planes = make_planes(3, 3, 128, seed=0)
    print("| T | state from the core's pass | autograd path: core, then keys hashed again | ratio |\n|---|---|---|---|")
    for T in parse_lengths(a.lengths):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, T, 128, generator=gen) for _ in range(3))
        ms = {}
        for way in ("core", "again"):
            for x in (q, k, v):  # inputs that need gradients take the second path (race_prefill's rule)
                x.requires_grad_(way == "again")
            times = []
            for _ in range(a.repeats + 1):
                t0 = time.perf_counter()
                with torch.set_grad_enabled(way == "again"):
                    race_prefill(q, k, v, planes, beta=8.0)
                times.append((time.perf_counter() - t0) * 1e3)
            ms[way] = statistics.median(times[1:])
        print(f"| {T:,} | {ms['core']:.0f} ms | {ms['again']:.0f} ms | {ms['again'] / ms['core']:.2f}x |")


if __name__ == "__main__":
    main()
