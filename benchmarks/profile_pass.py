"""Where one method's pass spends its fixed cost: one fwd+bwd pass as a sweep takes it (the protocol's loss),
profiled with torch.profiler over --passes passes after warm-up, reported per pass: host operations (aten calls),
kernel launches, host synchronizations (stream, device and event syncs: each one stalls the host until the GPU
drains), caching-allocator allocations, the host's time against the GPU's kernel time, and the operations that
cost most. The wall time per pass is measured beside it without the profiler (synchronized, median of --repeats).

    python benchmarks/profile_pass.py --method race --device cuda -T 2^12 [--causal] [--json out.json]
    python benchmarks/profile_pass.py --method race -T 2^12 --graphs     # the same pass replayed from a CUDA graph
    python benchmarks/profile_pass.py --method race -T 2^12 --variants eager,causal,graphs   # all three, one process

The 0.5 ms target of a race pass at 2^12 (docs/gpu-results.md) reads off `wall ms`; `launches` and `syncs` say what
to cut.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from racebench.bench.units import parse_length
from racebench.bench.worker import _pass_body
from racebench.methods.registry import BuildConfig, build_method, dtype_name, torch_dtype

SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
         "cuCtxSynchronize", "cudaMemcpy")  # cudaMemcpy without Async blocks the host too


def _is_sync(name: str) -> bool:
    return any(name == s or name.startswith(s + "_") for s in SYNCS)


def _is_launch(name: str) -> bool:
    return "LaunchKernel" in name  # cudaLaunchKernel(ExC), cuLaunchKernel(Ex): PyTorch's and Triton's kernels


def profile_pass(method: str, *, device: str, T: int, B: int = 1, H: int = 4, D: int = 128, dtype: str | None = None,
                 causal: bool = False, knobs: dict | None = None, passes: int = 5, repeats: int = 20,
                 graphs: bool = False, top: int = 12, trace: str | None = None) -> dict:
    dtype = dtype_name(dtype or ("bf16" if device == "cuda" else "fp32"))
    cfg = BuildConfig(B, H, T, D, dtype, device, causal, 0, knobs or {})
    fn = build_method(method, cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen, device=device, dtype=torch_dtype(dtype)).requires_grad_()
               for _ in range(3))
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    body = _pass_body(fn, q, k, v, "fwd+bwd")  # the pass as a sweep takes it

    def step():
        q.grad = k.grad = v.grad = None
        body()

    for _ in range(3):  # compiles, autotuning, the allocator's cache
        step()
    sync()
    if graphs:
        if not cuda:
            raise SystemExit("--graphs replays CUDA graphs: use --device cuda")
        from racebench.bench.graphs import capture

        replay, _ = capture(body, q, k, v, sync)

        def step():  # noqa: F811 - the replay is the pass
            replay()

    walls = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        walls.append((time.perf_counter() - t0) * 1e3)

    allocs_before = torch.cuda.memory_stats().get("allocation.all.allocated", 0) if cuda else 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=True) as prof:
        for _ in range(passes):
            step()
        sync()
    allocs = ((torch.cuda.memory_stats().get("allocation.all.allocated", 0) - allocs_before) / passes if cuda
              else None)
    events = prof.events()
    names = [e.name for e in events]
    cpu_ops = [e for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"]
    top_level = [e for e in cpu_ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    if not cuda:  # the CPU allocator has no counter: operations that allocate memory themselves
        allocs = sum(1 for e in events if getattr(e, "self_cpu_memory_usage", 0) > 0) / passes
    table = prof.key_averages().table(sort_by=("self_cuda_time_total" if cuda else "self_cpu_time_total"),
                                      row_limit=top)
    if trace:
        prof.export_chrome_trace(trace)
    return dict(
        method=method, device=device, dtype=dtype, B=B, H=H, T=T, D=D, causal=causal, graphs=graphs,
        wall_ms=statistics.median(walls), wall_ms_min=min(walls),
        aten_ops=len(top_level) / passes, aten_calls=len(cpu_ops) / passes,
        launches=sum(map(_is_launch, names)) / passes if cuda else None,
        kernels=len(kernels) / passes if cuda else None,
        kernel_ms=sum(e.device_time_total for e in kernels) / 1e3 / passes if cuda else None,
        syncs=sum(map(_is_sync, names)) / passes if cuda else None,
        sync_names=sorted({n for n in names if _is_sync(n)}),
        allocations=allocs,
        host_ms=sum(e.cpu_time_total for e in top_level) / 1e3 / passes,
        table=table,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="race")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-T", default="2^12")
    parser.add_argument("-B", type=int, default=1)
    parser.add_argument("-H", type=int, default=4)
    parser.add_argument("-D", type=int, default=128)
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--knob", action="append", default=[], metavar="K=V", help="a method knob, e.g. race_L=8")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--graphs", action="store_true", help="profile the pass replayed from a CUDA graph")
    parser.add_argument("--variants", help="several passes in one process, e.g. eager,causal,graphs (each: the "
                        "options above plus causal masking or graph replay)")
    parser.add_argument("--trace", help="also write a Chrome trace here")
    parser.add_argument("--json", help="write the figures here (a list with --variants)")
    a = parser.parse_args(argv)
    knobs = {}
    for item in a.knob:
        key, _, value = item.partition("=")
        knobs[key] = int(value) if value.lstrip("-").isdigit() else value
    variants = a.variants.split(",") if a.variants else [None]
    if unknown := set(variants) - {None, "eager", "causal", "graphs"}:
        parser.error(f"--variants takes eager, causal and graphs, not {', '.join(sorted(unknown))}")
    results = []
    for variant in variants:
        r = profile_pass(a.method, device=a.device, T=parse_length(a.T), B=a.B, H=a.H, D=a.D, dtype=a.dtype,
                         causal=a.causal or variant == "causal", knobs=knobs, passes=a.passes, repeats=a.repeats,
                         graphs=a.graphs or variant == "graphs", trace=a.trace)
        print(r["table"])
        shown = {k: v for k, v in r.items() if k != "table"}
        print("\n".join(f"{k:>12}: {v:.4g}" if isinstance(v, float) else f"{k:>12}: {v}" for k, v in shown.items()))
        results.append(shown)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results if a.variants else results[0], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
