"""One sweep point, measured inside its own child process (DESIGN.md, steps 2-3).

Inputs are made and the method built before any clock; a first warm-up pass checks the numbers; peak memory
is taken in a pass of its own; then the remaining warm-up passes and the timed passes, synchronized on CUDA.
On CPU the timed passes allocate as a long-running PyTorch process does (memory.py, settle_for_timing), and
count the page faults they take.
Any failure becomes a status, never an exception that escapes the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading
import time
import traceback

import torch

from racebench.bench import graphs, memory
from racebench.bench.spec import SweepSpec
from racebench.bench.units import format_bytes
from racebench.errors import UnsupportedError
from racebench.methods.registry import DECODE_MODES, NO_BUILD_ENV, get_method
from racebench.results.timing import timing_fields


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent goes (a rank of a --nproc point, with its point)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def die_with(pid: int) -> None:
    """Kill this process the moment process `pid` (the sweep) ends, however it ends, kill -9 included. A point's
    parent is the fork server, which can outlive the sweep, so the parent-death signal alone is not enough: a
    thread waits on a pidfd of the sweep (Linux 5.3), or polls it where there is none."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)
    except (OSError, AttributeError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has ended
        else:
            while _alive(pid):
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="racebench-die-with-sweep", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def point_row(spec: SweepSpec, method: str, T: int, **fields) -> dict:
    """The result row skeleton: identity of the point plus its status fields."""
    row = dict(method=method, device=spec.device, dtype=spec.dtype, B=spec.B, H=spec.H, T=T, D=spec.D,
               causal=spec.causal, mode=spec.mode, input_bytes=spec.input_bytes(T),
               floor_bytes=spec.floor_bytes(T), repeats=0, nproc=spec.nproc,
               decode_tokens=spec.decode_tokens if spec.mode == "decode" else None, cuda_graphs=spec.cuda_graphs)
    row.update(get_method(method).effective_knobs(spec.build_config(T)))
    row.update(fields)
    return row


class SumLoss(torch.autograd.Function):
    """The published protocol's loss, out.float().sum(), without its two full-size temporaries in bf16/fp16: the
    fp32 copy of out (forward) and the output gradient that autograd would materialize in out's dtype when
    casting the fp32 ones back (backward; one more [B, H, T, D] tensor than the memory floor counts). Same value
    up to summation order, same gradient, handed on as a broadcast view, as it already is for fp32 outputs."""

    @staticmethod
    def forward(ctx, out):
        ctx.shape, ctx.dtype = out.shape, out.dtype
        # A sum into fp32 reads bf16/fp16 directly on CUDA: one pass over out, as gpu_targets counts it. An fp32
        # copy first moved five times out's bytes (at 2^20, 5 GiB: ~1.3 ms at an H200's copy bandwidth, in
        # every method's 2^20 step; race's took 8.8 ms). The CPU converts first: 64M-element pieces bound that.
        return sum(piece.sum(dtype=torch.float32) for piece in out.detach().reshape(-1).split(2**26))

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).expand(ctx.shape)


def _pass_body(fn, q, k, v, mode):
    """One fwd or fwd+bwd pass returning its output, untimed: what _make_pass times and a CUDA graph captures."""

    def body():
        if mode == "fwd":
            with torch.no_grad():
                return fn(q, k, v)
        out = fn(q, k, v)
        SumLoss.apply(out).backward()  # the published protocol's loss
        return out

    return body


def _make_pass(fn, q, k, v, mode, sync):
    """A function running one pass and returning (seconds of its timed part, output)."""
    body = _pass_body(fn, q, k, v, mode)

    def run():
        q.grad = k.grad = v.grad = None
        if mode == "bwd":
            out = fn(q, k, v)
            loss = SumLoss.apply(out)
            sync()
            t0 = time.perf_counter()
            loss.backward()
        else:
            sync()
            t0 = time.perf_counter()
            out = body()
        sync()
        return time.perf_counter() - t0, out

    return run


def finite(*tensors) -> bool:
    """True when no element is NaN or Inf; checked in 4M-element pieces so the check itself allocates next
    to nothing (a full-size mask could push a point near its budget over it)."""
    return all(t is None or all(bool(torch.isfinite(piece).all()) for piece in t.detach().reshape(-1).split(2**22))
               for t in tensors)


def failure(exc: Exception) -> dict:
    """The status fields of a point that raised: oom when it ran out of memory, else error with the traceback."""
    if memory.is_oom(exc):
        return dict(status="oom", error=str(exc).splitlines()[0][:300])
    if isinstance(exc, UnsupportedError):  # a property of the method (e.g. not capturable in a CUDA graph)
        return dict(status="unsupported", error=str(exc)[:300])
    return dict(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                traceback=traceback.format_exc()[-2000:])


def verdict(spec: SweepSpec, start: float, peak_bytes: int) -> dict:
    """The status fields of a point that finished: over its memory budget is oom (the CPU's address-space cap leaves
    room for thread stacks and arenas above the budget, so a point can peak over it and still finish), over its
    time budget a time-out, else ok."""
    elapsed = time.perf_counter() - start
    if peak_bytes > spec.memory_budget_bytes:
        return dict(status="oom", error=f"peaked at {format_bytes(peak_bytes)}, over the "
                                        f"{format_bytes(spec.memory_budget_bytes)} memory budget")
    if elapsed > spec.time_budget_s:
        return dict(status="timeout", error=f"finished in {elapsed:.3g} s, over the {spec.time_budget_s:g} s budget")
    return dict(status="ok", error=None)


def early_timeout(spec: SweepSpec, start: float, first: float, passes_left: int) -> tuple[bool, dict]:
    """(whether to stop after the first pass, the time-out fields if so). The first pass also pays for fresh pages and
    lazy set-up, so stop early only when even half its time per pass would not fit; a point that finishes over budget
    is still a time-out (verdict)."""
    late = time.perf_counter() - start + first * passes_left / 2 > spec.time_budget_s
    return late, dict(status="timeout", time_ms=first * 1e3, error=(
        f"one pass took {first:.3g} s; {passes_left} more would exceed the {spec.time_budget_s:g} s budget"))


def measure_point(spec: SweepSpec, method: str, T: int) -> dict:
    """Run one point in this process (its ranks' processes with --nproc); returns its row."""
    start = time.perf_counter()
    if (why := spec.unsupported_reason(method)) is not None:
        return point_row(spec, method, T, status="unsupported", error=why)
    if spec.nproc > 1:
        from racebench.bench.parallel_worker import measure_parallel

        return measure_parallel(spec, method, T)
    m, cfg = get_method(method), spec.build_config(T)
    row = point_row(spec, method, T, impl=m.impl(cfg), threads=torch.get_num_threads())
    if spec.mode in DECODE_MODES:
        from racebench.bench.inference import measure_inference

        return measure_inference(spec, row, T, lambda: m.decode(cfg), start)
    return measure(spec, row, T, lambda: m.build(cfg), start)


def measure(spec: SweepSpec, row: dict, T: int, build, start: float, *, seed: int | None = None,
            agree=lambda stop: stop, barrier=lambda: None, counter=lambda: 0) -> dict:
    """The protocol for inputs of T tokens: inputs, first pass, memory pass, warm-up, timed passes.

    For ranks of a sequence-parallel point: `agree` makes an early stop collective, `barrier` joins every
    synchronization, `counter` reads the bytes this process has communicated."""
    mem = memory.for_device(spec.device, spec.memory_budget_bytes)
    try:
        mem.cap()
        before_inputs = mem.current()
        gen = torch.Generator(device=spec.device).manual_seed(spec.seed + T if seed is None else seed)
        q, k, v = (torch.randn(spec.B, spec.H, T, spec.D, generator=gen, device=spec.device,
                               dtype=spec.torch_dtype).requires_grad_(spec.mode != "fwd") for _ in range(3))
        fn = build()
        mem.sync()
        with_inputs = mem.current()
        run = _make_pass(fn, q, k, v, spec.mode, lambda: (mem.sync(), barrier()))

        first, out = run()  # the first warm-up pass also checks the numbers
        if agree(not finite(out, q.grad, k.grad, v.grad)):
            return row | dict(status="nonfinite", error="output or gradients hold NaN or Inf")
        eager_sum = graphs.checksum(out) if spec.cuda_graphs else None
        del out
        warm = max(spec.warmup - 1, 1)  # at least one pass fills the allocator's cache before timing
        late, timeout = early_timeout(spec, start, first, 1 + warm + spec.repeats)
        if agree(late):
            return row | timeout

        q.grad = k.grad = v.grad = None  # peak memory: a pass of its own, before the allocator caches
        mem.reset_peak()
        sent = counter()
        if spec.cuda_graphs:  # the graph's memory pool counts: capture and a first replay in the memory pass
            run, out = graphs.capture(_pass_body(fn, q, k, v, spec.mode), q, k, v, mem.sync)
            run()
        else:
            _, out = run()
        peak, sent = mem.peak(), counter() - sent
        if spec.cuda_graphs and not (finite(out, q.grad, k.grad, v.grad) and graphs.agrees(eager_sum, out)):
            return row | dict(status="error", error="the CUDA graph's replay disagrees with the eager pass")
        del out

        mem.settle_for_timing()
        for _ in range(warm):
            run()
        faults_before = mem.faults()
        times = [run()[0] for _ in range(spec.repeats)]
        faults = None if faults_before is None else (mem.faults() - faults_before) // spec.repeats
    except Exception as exc:  # every failure is data
        return row | failure(exc)
    measured = dict(peak_mem_bytes=peak - before_inputs, peak_mem_over_inputs_bytes=peak - with_inputs,
                    comm_bytes_per_step=sent, page_faults_per_pass=faults)
    timing = timing_fields([t * 1e3 for t in times], spec.B * row["T"])
    return row | timing | verdict(spec, start, peak - before_inputs) | measured


def child_main(conn, spec_dict: dict, method: str, T: int, sweep_pid: int | None = None) -> None:
    """Entry point of the child process: measure, send the row, exit. It dies with the sweep, and never compiles
    (the sweep built what its methods need before the first point: a build in here would eat the point's budget)."""
    die_with_parent()
    if sweep_pid is not None:
        die_with(sweep_pid)
    os.environ[NO_BUILD_ENV] = "1"
    row = measure_point(SweepSpec.from_dict(spec_dict), method, T)
    conn.send(row)
    conn.close()


def cuda_probe(conn) -> None:
    """Whether CUDA can be used in this child (runner.py starts CUDA points like it)."""
    try:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        ok = True
    except Exception:  # "Cannot re-initialize CUDA in forked subprocess", no driver, no device
        ok = False
    conn.send(ok)
    conn.close()
