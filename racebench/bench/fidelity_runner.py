"""`racebench fidelity`: walks lengths, inputs and draws, scores every method and knob setting against the exact
references of the same inputs, and writes a run folder like a sweep's (points.jsonl, results.csv, run.json)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from racebench.bench.environment import collect_environment
from racebench.bench.fidelity import (
    KL_MAX_T,
    FidelitySpec,
    References,
    draw_errors,
    make_inputs,
    relative_error,
    summarize,
)
from racebench.methods.registry import get_method
from racebench.results.store import RunStore, writing


def time_setting(spec: FidelitySpec, method: str, T: int, knobs: dict) -> dict:
    """The time per fwd+bwd pass of this method and setting at T: one point of the sweep's protocol (fp32, its own
    process, 1 warm-up + 3 timed passes)."""
    from racebench.bench.runner import run_child
    from racebench.bench.spec import SweepSpec

    sweep = SweepSpec(methods=(method,), lengths=(T,), B=spec.B, H=spec.H, D=spec.D, dtype="fp32", device="cpu",
                      causal=spec.causal, mode="fwd+bwd", warmup=1, repeats=3, time_budget_s=spec.time_budget_s,
                      memory_budget_bytes=spec.memory_budget_bytes, seed=spec.seed, knobs=knobs,
                      preset="fidelity", plugins=spec.plugins)
    row = run_child(sweep, method, T)
    return dict(time_ms=row.get("time_ms") if row["status"] == "ok" else None, time_status=row["status"],
                time_impl=row.get("impl"), time_error=row.get("error"))


def _key(method: str, knobs: dict, T: int, inputs: str) -> tuple:
    return method, tuple(sorted(knobs.items())), T, inputs


ProgressFn = Callable[[str, dict | None], None]  # (what, row or None)


def run_fidelity(spec: FidelitySpec, out: Path, *, command: str = "", resume: bool = False,
                 progress: ProgressFn | None = None, model_qkv=None) -> RunStore:
    """Every (method, setting, length, inputs) point: `draws` fresh draws of inputs (and of the method's random
    planes or projections), the errors' mean and spread, the uniform floor, and the setting's time per pass."""
    report = progress or (lambda what, row: None)
    with writing(out):
        if resume:
            store = RunStore(out)
            store.repair()
        else:
            meta = {"run_id": out.name, "kind": "fidelity", "command": command, "cwd": os.getcwd(),
                    "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(spec).items()},
                    "environment": collect_environment(),
                    "knob_columns": list(dict.fromkeys(k.name for m in spec.methods for k in get_method(m).knobs))}
            store = RunStore.create(out, meta)
        done = {_key(r["method"], {k: r[k] for k in r.get("setting", [])}, int(r["T"]), r["inputs"])
                for r in store.rows()}
        for m in spec.methods:
            get_method(m).prepare("cpu")
        if spec.model and model_qkv is None:
            from racebench.quality.model import model_inputs

            model_qkv, _ = model_inputs(spec.model, spec.H, spec.D)
        try:
            for T in spec.lengths:
                times: dict[tuple, dict] = {}
                for kind in spec.inputs:
                    _one_block(spec, store, done, times, T, kind, report, model_qkv)
        finally:
            store.write_table()
    return store


def _one_block(spec: FidelitySpec, store: RunStore, done: set, times: dict, T: int, kind: str, report,
               model_qkv) -> None:
    """All methods and settings at one length on one kind of inputs: the draws shared by all of them."""
    points = [(m, s) for m in spec.methods for s in spec.settings(m)
              if _key(m, s, T, kind) not in done]
    if not points:
        return
    results: dict[tuple, list] = {(m, tuple(sorted(s.items()))): [] for m, s in points}
    floors: dict[tuple, list] = {key: [] for key in results}
    failures: dict[tuple, tuple[str, str]] = {}
    started = time.perf_counter()
    for draw in range(spec.draws):
        seed = spec.seed + 1000 * draw
        q, k, v = make_inputs(kind, spec.B, spec.H, T, spec.D, seed + T, model_qkv)
        refs = References(q, k, v, spec.causal, weights=T <= KL_MAX_T)
        floor_softmax = relative_error(refs["uniform"], refs["softmax"])
        for m, s in points:
            key = (m, tuple(sorted(s.items())))
            if key in failures:
                continue
            report(f"{m} {_describe(s)} T={T} {kind} draw {draw + 1}/{spec.draws}", None)
            try:
                errors, target = draw_errors(spec, m, s, T, q, k, v, refs, seed)
                results[key].append(errors)
            except Exception as exc:  # unsupported, or a failure: a status, never a crash of the run
                from racebench.errors import UnavailableError, UnsupportedError

                status = "unsupported" if isinstance(exc, (UnsupportedError, UnavailableError)) else "error"
                failures[key] = (status, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                continue
            floors[key].append(dict(floor_softmax=floor_softmax, floor_target=None if target is None else
                                    relative_error(refs["uniform"], refs.target(*target))))
        del q, k, v, refs
    for m, s in points:
        key = (m, tuple(sorted(s.items())))
        cfg = spec.config(m, T, s, seed=spec.seed)
        method = get_method(m)
        row = dict(method=m, device="cpu", dtype="fp64", B=spec.B, H=spec.H, T=T, D=spec.D, causal=spec.causal,
                   mode="fidelity", inputs=kind, draws=spec.draws, setting=sorted(s))
        row.update(method.effective_knobs(cfg))
        if key in failures:
            status, error = failures[key]
            row.update(status=status, error=error)
        else:
            row.update(status="ok", error=None, impl=method.impl(cfg), **summarize(results[key], floors[key]))
            if spec.timed:
                if key not in times:
                    times[key] = time_setting(spec, m, T, s)
                row.update(times[key])
        row["point_wall_s"] = round(time.perf_counter() - started, 3)
        store.append(row)
        done.add(_key(m, s, T, kind))
        report(f"{m} {_describe(s)} T={T} {kind}", row)


def _describe(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
