"""The sweep runner: walks each method's lengths upward, one child process per point (DESIGN.md, step 4)."""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from racebench.bench.environment import collect_environment
from racebench.bench.spec import GRACE_S, SweepSpec
from racebench.bench.worker import child_main, cuda_probe, point_row
from racebench.methods.registry import get_method
from racebench.results.store import RunStore, writing
from racebench.results.summary import extrapolate

FAILURES = ("oom", "timeout")
_NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def _context(device: str):
    """Children fork from a server that has imported torch and racebench once and started no threads: fast starts
    (a fresh interpreter per CUDA point took about 4 s on an H200, most of a short point's wall time). CUDA cannot
    be used in a child forked from a process that has initialized it ("Cannot re-initialize CUDA in forked
    subprocess", every point of an H100 run), and importing racebench asks torch whether CUDA is there: the server
    asks through NVML, which leaves CUDA alone. Where a forked child still cannot use CUDA (no NVML: torch falls
    back to cuInit), CUDA points start fresh interpreters (spawn)."""
    os.environ.setdefault(_NVML_CHECK, "1")  # read by the server, a fresh interpreter started on first use
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["racebench.bench.worker"])
    if device == "cuda" and not _forked_children_use_cuda():
        return mp.get_context("spawn")
    return ctx


@functools.cache
def _forked_children_use_cuda() -> bool:
    """Once per process: whether a child of the fork server can initialize CUDA."""
    ok, _, _ = _call_in_child(mp.get_context("forkserver"), cuda_probe, (), 120)
    return bool(ok)


def _call_in_child(ctx, target, args: tuple, timeout_s: float):
    """Run target(conn, *args) in a child process of `ctx` and wait up to timeout_s for what it sends on conn:
    (what it sent or None, whether the wait timed out, the child's exit code). The child is gone on return."""
    recv, send = ctx.Pipe(duplex=False)
    # Not a daemon: a --nproc point starts its ranks from it. It dies with this process (worker.die_with).
    proc = ctx.Process(target=target, args=(send, *args))
    proc.start()
    send.close()
    value, timed_out = None, False
    try:
        timed_out = not recv.poll(timeout_s)  # a dead child reads as EOF at once
        value = None if timed_out else recv.recv()
    except (EOFError, OSError):
        value = None
    finally:
        if proc.is_alive() and value is None:
            proc.kill()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return value, timed_out, proc.exitcode


def run_child(spec: SweepSpec, method: str, T: int) -> dict:
    """Measure one point in its own process; a crash, a hang or a signal becomes the point's status."""
    ctx = _context(spec.device)  # (the first CUDA call probes the fork server: not the point's time)
    start = time.perf_counter()
    row, timed_out, exitcode = _call_in_child(ctx, child_main, (spec.to_dict(), method, T, os.getpid()),
                                              spec.time_budget_s + GRACE_S)
    wall = time.perf_counter() - start
    if row is None:
        if timed_out:
            row = point_row(spec, method, T, status="timeout",
                            error=f"killed after the {spec.time_budget_s:g} s time budget")
        elif exitcode is not None and exitcode < 0:
            name = signal.Signals(-exitcode).name
            row = point_row(spec, method, T, status="error", error=f"child killed by {name}")
        else:
            row = point_row(spec, method, T, status="error", error=f"child exited with code {exitcode}")
    row.pop("traceback", None)
    return row | {"point_wall_s": round(wall, 3)}


@dataclass
class MethodState:
    """What the runner knows of one method so far: completed points and the first failure."""

    ok: list[tuple[int, float]] = field(default_factory=list)  # (T, time_ms)
    failed: tuple[int, str] | None = None  # (T, status)

    def update(self, row: dict) -> None:
        if row["status"] == "ok":  # a decode point's time_ms is per token: its pass is the prefill and the tokens
            self.ok.append((row["T"], row.get("pass_ms") or row["time_ms"]))
        elif row["status"] in FAILURES and (self.failed is None or row["T"] < self.failed[0]):
            self.failed = (row["T"], row["status"])

    def last_ok(self) -> int | None:
        return max((T for T, _ in self.ok), default=None)

    def predict_ms(self, T: int) -> float | None:
        """One pass at T from the growth between the two longest completed points (power law)."""
        return extrapolate(self.ok, T)


def _plan_row(spec: SweepSpec, method: str, state: MethodState, T: int) -> dict | None:
    """A row recorded without running (unsupported, skipped) when the point should not run, else None."""
    if (why := spec.unsupported_reason(method)) is not None:
        return point_row(spec, method, T, status="unsupported", error=why)
    if state.failed and state.failed[0] < T:
        return point_row(spec, method, T, status="skipped",
                         error=f"{state.failed[1]} at T = {state.failed[0]}; longer lengths not tried")
    predicted = state.predict_ms(T)
    passes = spec.passes
    if predicted is not None and predicted * passes / 1e3 > spec.time_budget_s:
        return point_row(spec, method, T, status="skipped", predicted_ms=predicted, error=(
            f"predicted {predicted / 1e3:.3g} s per pass x {passes} passes exceeds the "
            f"{spec.time_budget_s:g} s budget"))
    return None


ProgressFn = Callable[..., None]  # (method, T, row or None, round)


def run_sweep(spec: SweepSpec, out: Path, *, resume: bool = False, command: str = "",
              progress: ProgressFn | None = None, measure: Callable = run_child) -> RunStore:
    """Run (or continue) a sweep into `out`, holding the folder's lock throughout. `progress(method, T, row, round)`
    is called before (row None) and after each point."""
    with writing(out):
        return _run_locked(spec, out, resume=resume, command=command, progress=progress, measure=measure)


def _run_locked(spec: SweepSpec, out: Path, *, resume: bool, command: str, progress: ProgressFn | None,
                measure: Callable) -> RunStore:
    if resume:
        store = RunStore(out)
        meta = store.meta()
        store.repair()
        meta.setdefault("resumed", []).append({"utc_time": collect_environment()["utc_time"], "command": command,
                                               "cwd": os.getcwd()})
        store.write_meta(meta)
    else:
        meta = {"run_id": out.name, "command": command, "cwd": os.getcwd(), "spec": spec.to_dict(),
                "environment": collect_environment(),
                # compare matches points on these, even where the methods' plugin is not loaded
                "knob_columns": list(dict.fromkeys(k.name for m in spec.methods for k in get_method(m).knobs))}
        if measure is run_child:  # how each point's process starts: forked from racebench's server, or spawned
            meta["point_start_method"] = _context(spec.device).get_start_method()
        store = RunStore.create(out, meta)
    done = {(r["method"], int(r["T"]), r.get("round") or 1): r for r in store.rows()}
    report = progress or (lambda method, T, row, round_: None)

    def point(method: str, T: int, state: MethodState, refine: bool = False, round_: int = 1) -> dict:
        if (method, T, round_) in done:
            row = done[(method, T, round_)]
        else:
            report(method, T, None, round_)
            row = (_plan_row(spec, method, state, T) if round_ == 1 else None) or measure(spec, method, T)
            row["refine"], row["round"] = refine, round_
            store.append(row)
            done[(method, T, round_)] = row
        state.update(row)
        report(method, T, row, round_)
        return row

    for method in spec.methods:  # e.g. build native kernels here, not inside a point's budget
        get_method(method).prepare(spec.device)
    try:
        for method in spec.methods:
            state = MethodState()
            for T in spec.lengths:
                point(method, T, state)
            if spec.refine and state.failed and state.last_ok():
                _refine(spec, method, state, point)
        # Later rounds measure every completed point again, each in a process of its own, spread over the run's
        # whole length, so that a point's rounds differ as much as two runs' processes do (compare's samples).
        first = [r for (_, _, n), r in done.items() if n == 1 and r["status"] == "ok"]
        for round_ in range(2, spec.rounds + 1):
            for r in first:
                point(r["method"], int(r["T"]), MethodState(), refine=bool(r.get("refine")), round_=round_)
    finally:
        store.write_table()
        meta = store.meta()
        meta["finished_utc"] = collect_environment()["utc_time"] if sys.exc_info()[0] is None else None
        store.write_meta(meta)
    return store


def _refine(spec: SweepSpec, method: str, state: MethodState, point) -> None:
    """Bisect between the longest completed length and the first failure, to relative precision spec.refine."""
    lo, (hi, _) = state.last_ok(), state.failed
    while lo and hi / lo - 1 > spec.refine:
        mid = int(math.sqrt(lo * hi))
        mid -= mid % 64 if mid > 1024 else 0  # round lengths for readable tables
        if not lo < mid < hi:
            break
        row = point(method, mid, state, refine=True)
        if row["status"] == "ok":
            lo = mid
        elif row["status"] in FAILURES:
            hi = mid
            state.failed = (mid, row["status"])
        else:
            break
