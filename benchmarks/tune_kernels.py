"""Time race's Triton kernels under alternative launch options on a GPU and write the fastest per kernel.

    python benchmarks/tune_kernels.py [--T 2^20] [--causal-T 2^18] [--json FILE] [--write-config FILE]

Each candidate (tile BT, num_warps, num_stages; programs per SM for the range-walking kernels) runs whole
forward+backward passes at the paper's shape (B=1, H=4, D=128, P=L=3, bf16) with the protocol's loss, non-causal
and causal, under torch.profiler, which gives every kernel's device time. A candidate counts only if its output
and gradients match the default configuration's (relative error under --max-error). The fastest counted option
of each kernel goes to --write-config, the file RACEBENCH_KERNEL_CONFIG takes (racebench/methods/race/launch.py);
run.json records the configuration a run used.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.profiler import ProfilerActivity, profile

from racebench import make_planes, race_attention
from racebench.bench.units import parse_length
from racebench.bench.worker import SumLoss
from racebench.methods.race import launch

NONCAUSAL = ("state_kernel", "out_kernel", "dq_kernel", "dkv_kernel")
CAUSAL = ("causal_fwd_kernel", "causal_dq_kernel", "causal_dkv_kernel")
# [B, H, T, D] tensors each kernel reads or writes in one pass with the protocol's loss (its output gradient is
# one broadcast row, read from cache; the causal backward reads o for the paper normalization's denominators):
# with a kernel's time, the rate it moves memory at, to set against the copy bandwidth (ceilings.py).
PASSES = {"state_kernel": 2, "out_kernel": 2, "dq_kernel": 2, "dkv_kernel": 4, "causal_fwd_kernel": 4,
          "causal_dq_kernel": 5, "causal_dkv_kernel": 6}


def candidates(causal: bool) -> list[dict]:
    """Launch configurations to try: one option set applied to every kernel of a family, then programs per SM.
    Few, since each costs a compile of every kernel of the family (seconds each, in parallel: precompile)."""
    if causal:
        family = [{k: dict(num_warps=w, num_stages=1) for k in CAUSAL} for w in (4, 8)]
    else:
        options = ((64, 4, 1, False), (64, 8, 1, False), (32, 4, 1, False), (32, 8, 1, False), (64, 4, 2, False),
                   (64, 4, 1, True), (64, 4, 2, True))  # BT, num_warps, num_stages, WALK (out and dkv kernels)
        family = [{k: dict(BT=bt, num_warps=w, num_stages=st) | ({"WALK": walk} if "WALK" in launch.DEFAULTS[k] else {})
                   for k in NONCAUSAL} for bt, w, st, walk in options]
    return family + [{"programs_per_sm": per_sm} for per_sm in (2, 8, 16)]


def run_once(q, k, v, planes, causal):
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    o = race_attention(*xs, planes, beta=8.0, causal=causal, impl="triton")
    SumLoss.apply(o).backward()
    return [o.detach()] + [x.grad for x in xs]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(config: dict, q, k, v, planes, causal, reference, repeats: int) -> dict:
    """Per-kernel device time (ms, mean over repeats) and the whole pass, under `config`."""
    with launch.overridden(config):
        try:
            out = run_once(q, k, v, planes, causal)  # compiles
            sync()
        except Exception as exc:  # a configuration the compiler or the device refuses
            return dict(error=f"{type(exc).__name__}: {exc}"[:300])
        error = max(rel(a, b) for a, b in zip(out, reference))
        del out
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            run_once(q, k, v, planes, causal)
        sync()
        total = (time.perf_counter() - t0) * 1e3 / repeats
        with profile(activities=[ProfilerActivity.CUDA if q.is_cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                run_once(q, k, v, planes, causal)
            sync()
    kernels = {}
    for evt in prof.key_averages():
        # A Triton kernel shows under its function's name (older Triton versions append a signature).
        name = next((k for k in NONCAUSAL + CAUSAL if evt.key.startswith(k)), None)
        if name is not None:
            us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
            kernels[name] = kernels.get(name, 0.0) + us / 1e3 / repeats
    return dict(total_ms=total, kernels_ms=kernels, error=None, max_rel_error=error)


def best_config(rows: list[dict], max_error: float) -> dict:
    """The fastest option of each kernel over the rows that ran and matched the reference."""
    chosen, best = {}, {}
    ok = [r for r in rows if r["result"].get("error") is None and r["result"]["max_rel_error"] <= max_error]
    for row in ok:
        for name, ms in row["result"]["kernels_ms"].items():
            if name in row["config"] and ms < best.get(name, float("inf")):
                best[name], chosen[name] = ms, row["config"][name]
    # Programs per SM is one setting for every kernel: the one with the least time over both families.
    totals = {}
    for row in ok:
        per_sm = row["config"].get("programs_per_sm", None if row["config"] else launch.PROGRAMS_PER_SM)
        if per_sm is not None:
            totals.setdefault(per_sm, {})[row["causal"]] = row["result"]["total_ms"]
    complete = {per_sm: sum(t.values()) for per_sm, t in totals.items() if len(t) == 2}
    if complete and (fastest := min(complete, key=complete.get)) != launch.PROGRAMS_PER_SM:
        chosen["programs_per_sm"] = fastest
    return chosen


def label(config: dict) -> str:
    if not config:
        return "default"
    if "programs_per_sm" in config:
        return f"programs_per_sm={config['programs_per_sm']}"
    opts = config.get("out_kernel") or next(iter(config.values()))
    return " ".join(f"{k}={v}" for k, v in opts.items())


def _compile(config: dict, causal: bool, device: str) -> str | None:
    """One short pass under `config`, so that its kernels land in Triton's on-disk cache (a spawned worker)."""
    planes = make_planes(3, 3, 128, seed=0).to(device)
    q, k, v = (torch.randn(1, 4, 1024, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    try:
        with launch.overridden(config):
            run_once(q, k, v, planes, causal)
    except Exception as exc:  # measure() reports it again, in its place
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def precompile(work: list[tuple[dict, bool]], device: str, jobs: int) -> None:
    """Compile every candidate's kernels in parallel processes first: compiles take seconds each and Triton runs
    them one at a time in a process; the measurements then find them in the cache."""
    if jobs <= 1 or device != "cuda":
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, *zip(*work), [device] * len(work)))


def report(rows, args, dev):
    """Write what has been measured so far: a stage limit may stop the tuner part way."""
    # The interpreter's times say nothing about a GPU: a dry run checks the options' results, and keeps the defaults.
    chosen = best_config(rows, args.max_error) if dev.type == "cuda" else {}
    if args.json:
        device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, chosen=chosen, device=device), f, indent=1)
    if args.write_config:
        with open(args.write_config, "w") as f:
            json.dump(chosen, f, indent=1)
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", default="2^20", help="non-causal length")
    parser.add_argument("--causal-T", default="2^18", help="causal length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-error", type=float, default=1e-2, help="largest relative difference from the default")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--write-config", help="write the chosen launch configuration here")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run on Triton's interpreter "
                        "(TRITON_INTERPRET=1; no kernel times)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles first")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("tune_kernels times kernels on a GPU; none is visible")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("a dry run on the CPU needs TRITON_INTERPRET=1")
    dev = torch.device(args.device)
    planes = make_planes(3, 3, 128, seed=0).to(dev)
    families = ((False, parse_length(args.T)), (True, parse_length(args.causal_T)))
    t0 = time.perf_counter()
    # Programs per SM changes no compiled kernel, and the defaults' kernels are compiled by the reference pass.
    precompile([(c, causal) for causal, _ in families for c in candidates(causal) if "programs_per_sm" not in c],
               args.device, args.jobs)
    print(f"compiled the candidates in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for causal, T in families:
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, 4, T, 128, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
        with launch.overridden({}):
            reference = run_once(q, k, v, planes, causal)
        for config in [{}] + candidates(causal):
            t0 = time.perf_counter()
            result = measure(config, q, k, v, planes, causal, reference, args.repeats)
            row = dict(causal=causal, T=T, label=label(config), config=config, result=result)
            rows.append(row)
            report(rows, args, dev)
            moved = {n: PASSES[n] * q.numel() * q.element_size() / max(ms, 1e-9) / 1e9  # TB/s
                     for n, ms in result.get("kernels_ms", {}).items()}
            kern = " ".join(f"{n.replace('_kernel', '')} {ms:.3f} ({moved[n]:.2f} TB/s)"
                            for n, ms in result.get("kernels_ms", {}).items())
            print(f"{'causal' if causal else 'non-causal'} T={T} {row['label']:32s} "
                  + (f"total {result['total_ms']:.3f} ms  [{kern}]  max rel. error {result['max_rel_error']:.1e}"
                     if result.get("error") is None else f"FAILED {result['error']}")
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        del q, k, v, reference
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("chosen:", json.dumps(report(rows, args, dev)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
