"""`racebench quality`: one TinyLM per (method, length) trained on MQAR from the same seed, steps and optimizer,
scored on held-out sequences per pair count, into a run folder like a sweep's (kind "quality")."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from racebench.errors import UsageError
from racebench.methods.registry import get_method
from racebench.quality.training import Training

PRESETS: dict[str, dict[str, Any]] = {
    # About ten minutes on a 2-core CPU for the four methods.
    "default": dict(methods="flash,race,linear,performer", lengths="128,256", pairs="4,8,16", steps=350, d_model=64,
                    vocab=64, device="cpu"),
    # Longer sequences, more pairs, a wider model and more steps, for a GPU.
    "gpu": dict(methods="flash,race,linear,performer", lengths="512,1024,2048", pairs="8,16,32,64,128",
                steps=4000, d_model=128, vocab=512, device="cuda"),
}


@dataclass(frozen=True)
class QualitySpec(Training):
    """A quality run: the training fields every model shares (training.py), and what is trained and scored."""

    methods: tuple[str, ...]
    lengths: tuple[int, ...]
    pairs: tuple[int, ...]
    preset: str = "default"
    plugins: tuple[str, ...] = ()

    def train_config(self, T: int):
        """The training of one model at length T."""
        from racebench.quality.train import TrainConfig

        return TrainConfig(T=T, pairs=self.pairs, **self.training())


def build_quality_spec(*, preset=None, methods=None, lengths=None, pairs=None, steps=None, d_model=None,
                       seed=None, knobs=None, plugins=()) -> QualitySpec:
    from racebench.bench.fidelity import parse_assignments
    from racebench.bench.spec import choose_preset, load_plugin_files, parse_methods, resolve_device
    from racebench.bench.units import parse_lengths

    plugin_paths = load_plugin_files(plugins)
    name, p = choose_preset(PRESETS, preset, "quality")
    names = parse_methods(p["methods"] if methods is None else methods)
    for m in names:
        if not get_method(m).causal:
            raise UsageError(f"--methods: {m} has no causal form; MQAR is a causal task")
    lens = tuple(parse_lengths(p["lengths"] if lengths is None else lengths))
    try:
        counts = tuple(int(x) for x in str(p["pairs"] if pairs is None else pairs).split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--pairs takes comma-separated whole numbers, not {pairs!r}") from None
    if not counts or min(counts) < 1:
        raise UsageError(f"--pairs must be positive whole numbers, not {pairs!r}")
    if not any(c <= T // 4 for c in counts for T in lens):
        raise UsageError(f"--pairs: none fits the lengths {', '.join(map(str, lens))} (at most T / 4 pairs)")
    if max(counts) > p["vocab"] // 2 - 1:
        raise UsageError(f"--pairs {max(counts)}: the preset's vocabulary of {p['vocab']} tokens holds "
                         f"{p['vocab'] // 2 - 1} distinct keys")
    n_steps = int(p["steps"] if steps is None else steps)
    width = int(p["d_model"] if d_model is None else d_model)
    if n_steps < 1 or width < 1:
        raise UsageError("--steps and --d-model must be positive")
    return QualitySpec(methods=names, lengths=lens, pairs=counts, steps=n_steps, d_model=width, vocab=p["vocab"],
                       seed=int(seed or 0),
                       knobs=parse_assignments(knobs, names, many=False), device=resolve_device(p["device"]),
                       preset=name, plugins=plugin_paths)


ProgressFn = Callable[[str, int, int, float | None, list[dict] | None], None]  # (method, T, step, loss, rows)


def run_quality(spec: QualitySpec, out: Path, *, command: str = "", progress: ProgressFn | None = None):
    """Train and score every (method, length); one row per (method, length, pair count), written as each model
    finishes (the loss curve and the accuracy every eval_every steps ride in points.jsonl)."""
    from racebench.bench.environment import collect_environment
    from racebench.results.store import RunStore, writing

    report = progress or (lambda *args: None)
    with writing(out):
        meta = {"run_id": out.name, "kind": "quality", "command": command, "cwd": os.getcwd(),
                "spec": dataclasses.asdict(spec), "environment": collect_environment(),
                "knob_columns": list(dict.fromkeys(k.name for m in spec.methods for k in get_method(m).knobs))}
        store = RunStore.create(out, meta)
        try:
            for T in spec.lengths:
                for method in spec.methods:
                    cfg = spec.train_config(T)
                    rows = _train_rows(spec, method, cfg, lambda step, loss, m=method, t=T: report(m, t, step, loss,
                                                                                                  None), out)
                    for row in rows:
                        store.append(row)
                    report(method, T, spec.steps, None, rows)
        finally:
            store.write_table()
    return store


def _train_rows(spec: QualitySpec, method: str, cfg, on_step, out: Path | None = None) -> list[dict]:
    from racebench.methods.registry import BuildConfig
    from racebench.quality.train import train

    m = get_method(method)
    build = BuildConfig(cfg.batch, cfg.heads, cfg.T, cfg.d_model // cfg.heads, "fp32", spec.device, True, spec.seed,
                        spec.knobs)
    base = dict(method=method, device=spec.device, dtype="fp32", B=cfg.batch, H=cfg.heads, T=cfg.T,
                D=cfg.d_model // cfg.heads, causal=True, mode="quality", steps=cfg.steps, d_model=cfg.d_model,
                layers=cfg.layers, lr=cfg.lr, vocab=cfg.vocab) | m.effective_knobs(build)
    usable = cfg.usable_pairs()
    if (why := m.supports(build)) is not None:
        return [base | dict(pairs=p, status="unsupported", error=why) for p in usable]
    try:
        result = train(method, cfg, on_step=on_step)
    except Exception as exc:  # a status, never a crash of the run
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return [base | dict(pairs=p, status="error", error=error) for p in usable]
    if m.family == "softmax" and out is not None:  # real attention patterns for `racebench fidelity --inputs model`
        from racebench.quality.model import save_model

        save_model(result["model"], out / f"model-{method}-T{cfg.T}.pt", dict(
            method=method, vocab=cfg.vocab, T=cfg.T, batch=cfg.batch, d_model=cfg.d_model, layers=cfg.layers,
            heads=cfg.heads, seed=cfg.seed))
    losses = result["losses"]
    finite = len(losses) == cfg.steps
    return [base | dict(pairs=p, status="ok" if finite else "nonfinite", error=None if finite else
                        f"loss {losses[-1]} at step {len(losses)}", accuracy=result["final"].get(p),
                        final_loss=sum(losses[-50:]) / len(losses[-50:]), train_s=round(result["seconds"], 2),
                        accuracy_by_step=[[s, acc[p]] for s, acc in result["curve"]], losses=losses)
            for p in usable]
