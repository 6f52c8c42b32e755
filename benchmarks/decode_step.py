"""What one decoded token of race costs on the CPU, and how much of it is the native kernel: the step as a sweep times
it (the method's Decoder), race_decode_step, the native kernel alone, and the PyTorch step, each on the token's
q, k, v sliced out in advance as the sweep does. In turns of BLOCK consecutive tokens each, in one process, so that
the machine's drift hits all four alike while each runs as a sweep runs it, token after token (interleaved token
by token, whichever ran after the PyTorch step paid about 15 us more for the caches it had evicted). B=1, H=4,
D=128, P=L=3, fp32, median over --tokens.

    python benchmarks/decode_step.py [--T 2^12] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from racebench.bench.units import parse_length
from racebench.methods.race import generate, native
from racebench.methods.race.hashing import make_planes
from racebench.methods.registry import BuildConfig, get_method

BLOCK = 50


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", default="2^12")
    parser.add_argument("--tokens", type=int, default=2000)
    a = parser.parse_args(argv)
    if not native.available():
        raise SystemExit(f"the native kernels are not built here: {native.build_error()}")
    T, G, (B, H, D) = parse_length(a.T), a.tokens, (1, 4, 128)
    cfg = BuildConfig(B, H, T, D, "fp32", "cpu", True, 0, {}, mode="decode", decode_tokens=G)
    decoder = get_method("race").decode(cfg)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T + G, D, generator=gen) for _ in range(3))
    planes = make_planes(3, 3, D, seed=0)  # race_decode_step's own: the decoder above holds its own planes
    with torch.no_grad():
        _, states = decoder.prefill(q[..., :T, :], k[..., :T, :], v[..., :T, :])
        _, mine = generate.race_prefill(q[..., :T, :], k[..., :T, :], v[..., :T, :], planes, beta=8.0)
        torch_state = generate.RaceState(mine.A.clone(), mine.KV.clone())  # W None: the PyTorch step
        fresh = [tuple(x[..., t:t + 1, :] for x in (q, k, v)) for t in range(T, T + G)]  # sliced in advance
        rows = [tuple(x.reshape(B * H, D) for x in s) for s in fresh]
        o = torch.empty(B * H, D)
        A, KV = mine.A.view(B * H, -1), mine.KV.view(B * H, -1, D)
        steps = {
            "sweep's step": lambda t: decoder.step(states, *fresh[t]),
            "race_decode_step": lambda t: generate.race_decode_step(mine, *fresh[t], planes, beta=8.0),
            "native kernel alone":
                lambda t: native.decode_step(*rows[t], A, KV, o, mine.W, 3, 3, 8.0, "paper", 1e-6),
            "PyTorch step": lambda t: generate.race_decode_step(torch_state, *fresh[t], planes, beta=8.0),
        }
        times = {name: [] for name in steps}
        for start in range(0, G, BLOCK):  # each variant in turn, a block of consecutive tokens at a time
            for name, step in steps.items():
                for t in range(start, min(start + BLOCK, G)):
                    t0 = time.perf_counter()
                    step(t)
                    times[name].append((time.perf_counter() - t0) * 1e6)
    print(f"| T = {T:,}, {G} tokens | median us per token |\n|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} |")


if __name__ == "__main__":
    main()
