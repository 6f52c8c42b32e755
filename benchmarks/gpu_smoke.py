"""First contact with a device: race's Triton kernels against the PyTorch core on the same inputs, at the
paper's shapes (B=1, H=4, D=128, P=L=3, bf16), causal and not, forward and backward; then one step the way a
sweep takes it (the protocol's loss, whose gradient is a broadcast view: another compiled variant), so the
sweeps' children find every kernel in Triton's cache instead of compiling inside their first, budgeted pass.

    python benchmarks/gpu_smoke.py [--T 4096]
"""

from __future__ import annotations

import argparse
import time

import torch

from racebench import make_planes, race_attention
from racebench.bench.worker import SumLoss


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dev = torch.device(args.device)
    planes = make_planes(3, 3, 128, seed=0).to(dev)
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
        print(f"{'causal' if causal else 'non-causal'} T={args.T}: triton bf16 vs torch fp32, rel. error "
              + " ".join(f"{n} {e:.1e}" for n, e in zip(("o", "dq", "dk", "dv"), errs))
              + f"; first call (compiles) {results['triton'][1]:.1f} s", flush=True)
        xs = [x.bfloat16().requires_grad_() for x in (q, k, v)]
        SumLoss.apply(race_attention(*xs, planes, beta=8.0, causal=causal, impl="triton")).backward()


if __name__ == "__main__":
    main()
