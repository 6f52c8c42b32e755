"""Per-function times of race's native CPU kernels (racebench/methods/race/csrc/race_cpu.cpp) for one head, with
every output already touched, so what is timed is the kernels' arithmetic and memory traffic, not page faults.

    python benchmarks/native_kernels.py                 # T = 2^18, D = 128, P = L = 3, fp32
    python benchmarks/native_kernels.py --T 2^16 --D 64

Minimum of --repeats calls of each function after one warm-up call; the protocol's broadcast output gradient.
Their sum times 4 is the arithmetic of one fwd+bwd at H = 4; the multiply-adds per token are in docs/cpu-kernels.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from racebench.bench.units import parse_length
from racebench.methods.race import native
from racebench.methods.race.hashing import make_planes
from racebench.methods.race.lean import make_config


def min_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="2^18", help="tokens (2^18, 262144, 256K)")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--P", type=int, default=3)
    ap.add_argument("--L", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not native.available():
        raise SystemExit(f"the native kernels are not built here: {native.build_error()}")
    T, D = parse_length(args.T), args.D
    q, k, v = (torch.randn(T, D) for _ in range(3))
    cfg = make_config(q, make_planes(args.L, args.P, D), 8.0, "paper", 1e-6)
    o, dq, dk, dv = (torch.zeros(T, D) for _ in range(4))
    do = torch.ones(1, 1).expand(T, D)
    A, KV = native.key_state(k, v, cfg)
    dA, dKV = native.query_backward(q, do, A, KV, dq, cfg)
    times = {
        "key_state": min_seconds(lambda: native.key_state(k, v, cfg), args.repeats),
        "query_forward": min_seconds(lambda: native.query_forward(q, A, KV, o, cfg), args.repeats),
        "query_backward": min_seconds(lambda: native.query_backward(q, do, A, KV, dq, cfg), args.repeats),
        "key_backward": min_seconds(lambda: native.key_backward(k, v, dA, dKV, dk, dv, cfg), args.repeats),
    }
    print(f"T={T} D={D} P={args.P} L={args.L} fp32, one head, {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"  {name:15s} {t * 1e3:8.1f} ms")
    print(f"  {'total':15s} {sum(times.values()) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
