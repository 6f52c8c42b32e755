"""First contact with a device: race's Triton kernels against the PyTorch core on the same inputs, at the
paper's shapes (B=1, H=4, D=128, P=L=3, bf16), causal and not, forward and backward; then one step the way a
sweep takes it (the protocol's loss, whose gradient is a broadcast view: another compiled variant), so the
sweeps' children find every kernel in Triton's cache instead of compiling inside their first, budgeted pass.
Last, one step at --large-T (2^24 by default on CUDA: T * D reaches 2^31, so Triton passes the row strides as
64-bit integers, another compiled variant, the one the sweeps' longest points run) on periodic inputs, a block of
4096 tokens repeated: each row of the output and of the gradients must equal the block's own (RACE's
normalization cancels the repeat count), which checks the 64-bit addressing with memory for one head only.
Exits 1 where a relative difference exceeds --max-error.

    python benchmarks/gpu_smoke.py [--T 4096] [--large-T 2^24]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from racebench import make_planes, race_attention
from racebench.bench.units import parse_length
from racebench.bench.worker import SumLoss

NAMES = ("o", "dq", "dk", "dv")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def protocol_step(xs, planes, causal=False):
    """One fwd+bwd step as the sweeps take it (bf16, the protocol's loss): output and gradients."""
    xs = [x.detach().requires_grad_() for x in xs]
    o = race_attention(*xs, planes, beta=8.0, causal=causal, impl="triton")
    SumLoss.apply(o).backward()
    return [o.detach()] + [x.grad for x in xs]


def periodic_error(T: int, dev, planes, block: int = 4096, tile=lambda x, times: x.repeat(1, 1, times, 1)):
    """Relative difference of a step on a block repeated T / block times (`tile`) from the block's own step, per
    tensor."""
    base = [torch.randn(1, 1, block, 128, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    small = protocol_step(base, planes)
    large = protocol_step([tile(x, T // block) for x in base], planes)
    errs = []
    for big, ref in zip(large, small):
        ref = ref.reshape(block, -1).float()
        rows = big.reshape(T // block, block, -1)
        # In slices of 64 repeats: a bounded fp32 temporary.
        sq = sum(((rows[i:i + 64].float() - ref) ** 2).sum().item() for i in range(0, rows.shape[0], 64))
        errs.append((sq / (ref.square().sum().item() * rows.shape[0])) ** 0.5)
    return errs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--large-T", default="2^24", help="length of the periodic 64-bit check; 0 skips it")
    parser.add_argument("--max-error", type=float, default=5e-2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dev = torch.device(args.device)
    planes = make_planes(3, 3, 128, seed=0).to(dev)
    worst = 0.0
    for causal in (False, True):
        # Inputs representable in bf16, so the two see the same numbers and differ only in their arithmetic.
        q, k, v = (torch.randn(1, 4, args.T, 128, device=dev).bfloat16().float() for _ in range(3))
        g = torch.randn_like(q).bfloat16().float()
        results = {}
        for impl, dtype in (("triton", torch.bfloat16), ("torch", torch.float32)):
            xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
            t0 = time.perf_counter()
            o = race_attention(*xs, planes, beta=8.0, causal=causal, impl=impl)
            grads = torch.autograd.grad(o, xs, g.to(dtype))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            results[impl] = ((o, *grads), time.perf_counter() - t0)
        errs = [rel(a, b) for a, b in zip(results["triton"][0], results["torch"][0])]
        worst = max(worst, *errs)
        print(f"{'causal' if causal else 'non-causal'} T={args.T}: triton bf16 vs torch fp32, rel. error "
              + " ".join(f"{n} {e:.1e}" for n, e in zip(NAMES, errs))
              + f"; first call (compiles) {results['triton'][1]:.1f} s", flush=True)
        protocol_step([x.bfloat16() for x in (q, k, v)], planes, causal)
    large = parse_length(args.large_T) if args.large_T != "0" else 0
    if large:
        t0 = time.perf_counter()
        errs = periodic_error(large, dev, planes)
        worst = max(worst, *errs)
        print(f"non-causal T={large} (H=1, a 4096-token block repeated): rows vs the block's own step, rel. error "
              + " ".join(f"{n} {e:.1e}" for n, e in zip(NAMES, errs))
              + f"; {time.perf_counter() - t0:.1f} s with compiles", flush=True)
    if worst > args.max_error:
        print(f"FAILED: a relative difference of {worst:.1e} exceeds {args.max_error:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
