"""A sequence-parallel sweep point (--nproc N): N local rank processes, each with its own memory budget,
each holding a contiguous shard of the sequence, joined by torch.distributed (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import socket
import time

import torch
import torch.distributed as dist

from racebench.bench.spec import SweepSpec
from racebench.bench.worker import die_with_parent, measure, point_row
from racebench.methods.registry import get_method
from racebench.results.timing import timing_fields


def shard_bounds(T: int, n: int) -> list[int]:
    """Contiguous, as even as possible: the first T % n shards get one token more."""
    sizes = [T // n + (r < T % n) for r in range(n)]
    return [sum(sizes[:r]) for r in range(n + 1)]


def measure_parallel(spec: SweepSpec, method: str, T: int) -> dict:
    """Run in the point's own process: start the ranks (forked on CPU, spawned on CUDA), merge their rows."""
    ctx = mp.get_context("spawn" if spec.device == "cuda" else "fork")  # CUDA survives no fork (runner.py)
    results = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bounds = shard_bounds(T, spec.nproc)
    ranks = [ctx.Process(target=_rank_main, args=(spec, method, T, bounds, r, port, results))
             for r in range(spec.nproc)]
    for p in ranks:
        p.start()
    rows, deadline = [], time.monotonic() + spec.time_budget_s + 10
    try:
        while len(rows) < spec.nproc and time.monotonic() < deadline:
            if not results.empty():
                rows.append(results.get())
                if rows[-1]["status"] != "ok":
                    break  # the others may wait forever in a collective
            elif any(p.exitcode not in (None, 0) for p in ranks):
                break
            else:
                time.sleep(0.05)
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
            p.join()
    return _merge(spec, method, T, rows, ranks)


def _merge(spec, method, T, rows, ranks) -> dict:
    base = point_row(spec, method, T, impl="sequence-parallel", nproc=spec.nproc)
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        return base | dict(status=bad[0]["status"], time_ms=bad[0].get("time_ms"),
                           error=f"rank {bad[0]['rank']}: {bad[0].get('error')}")
    if len(rows) < spec.nproc:
        dead = [p.exitcode for p in ranks if p.exitcode not in (None, 0)]
        status = "error" if dead else "timeout"
        return base | dict(status=status, error=f"a rank exited with code {dead[0]}" if dead
                           else f"ranks unfinished after the {spec.time_budget_s:g} s budget")
    rows.sort(key=lambda r: r["rank"])
    times = [max(ts) for ts in zip(*(r["times_ms"] for r in rows))]  # a step ends when its slowest rank does
    faults = [r.get("page_faults_per_pass") for r in rows]
    return base | timing_fields(times, spec.B * T) | dict(
        status="ok", threads=rows[0].get("threads"),
        peak_mem_bytes=sum(r["peak_mem_bytes"] for r in rows),
        peak_mem_over_inputs_bytes=sum(r["peak_mem_over_inputs_bytes"] for r in rows),
        rank_peak_mem_bytes=json.dumps([r["peak_mem_bytes"] for r in rows]),
        comm_bytes_per_step=max(r["comm_bytes_per_step"] for r in rows),
        page_faults_per_pass=None if None in faults else sum(faults),  # all ranks' together
    )


def _rank_main(spec: SweepSpec, method: str, T: int, bounds: list[int], rank: int, port: int, results) -> None:
    die_with_parent()
    start = time.perf_counter()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.nproc))  # ranks share this machine's cores
    cuda = spec.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    T_local = bounds[rank + 1] - bounds[rank]
    row = {"rank": rank, "T": T, "threads": torch.get_num_threads(), "status": "error",
           "error": "the rank failed before measuring"}
    try:
        fn, sent = get_method(method).sequence_parallel(spec.build_config(T_local))

        def agree(stop: bool) -> bool:
            flag = torch.tensor([int(stop)], device=spec.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=spec.nproc,
                                timeout=dt.timedelta(seconds=spec.time_budget_s + 60))
        row = measure(spec, row, T_local, lambda: fn, start, seed=spec.seed + T + rank, agree=agree,
                      barrier=dist.barrier, counter=sent)
    finally:
        results.put(row)
        if dist.is_initialized():
            dist.destroy_process_group()
