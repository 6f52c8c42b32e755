"""One sequence-parallel RACE forward+backward under torchrun, on one machine or many.

    torchrun --nproc-per-node 2 benchmarks/sp_torchrun.py --tokens 1M            # 2 local CPU processes (gloo)
    torchrun --nnodes 16 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        benchmarks/sp_torchrun.py --tokens 1G --dtype bf16                         # 128 GPUs (NCCL)

Each rank holds a contiguous shard of the sequence (B=1, H=4, D=128 by default). Prints, from rank 0, the step
time (slowest rank; warm-up step first), the largest per-rank peak memory and the bytes each rank communicated.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from racebench.bench.parallel_worker import shard_bounds
from racebench.bench.units import format_bytes, parse_length
from racebench.methods.race import DEFAULT_BETA, make_planes
from racebench.methods.race import parallel as sp
from racebench.methods.registry import DTYPES, torch_dtype


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1M")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--causal", action="store_true")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if cuda else "cpu"
    T = parse_length(args.tokens)
    lo, hi = shard_bounds(T, world)[rank : rank + 2]
    q, k, v = (torch.randn(1, args.heads, hi - lo, args.head_dim, device=device, dtype=torch_dtype(args.dtype),
                           requires_grad=True) for _ in range(3))
    planes = make_planes(3, 3, args.head_dim, seed=0).to(device)

    def step() -> float:
        q.grad = k.grad = v.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        sp.race_attention_sp(q, k, v, planes, beta=DEFAULT_BETA, causal=args.causal).float().sum().backward()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - t0

    step()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sent = sp.bytes_communicated
    seconds = step()
    stats = torch.tensor([(torch.cuda.max_memory_allocated() if cuda else 0), sp.bytes_communicated - sent],
                         dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"{world} ranks, {T} tokens ({(hi - lo)} on rank 0): step {seconds:.3f} s, "
              f"largest rank peak {format_bytes(stats[0].item()) if cuda else 'n/a on CPU'}, "
              f"{format_bytes(stats[1].item())} communicated per rank")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
