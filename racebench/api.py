"""The library surface: everything the CLI does, as functions (racebench exports them too).

Nothing here imports torch at import time; a sweep loads it when it starts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from racebench.bench.spec import MODES, PRESETS
from racebench.errors import UsageError
from racebench.methods.registry import DTYPES, load_plugins
from racebench.results.store import load_meta, load_run

RESULTS_DIR = Path("results")
PRESET_NAMES = tuple(PRESETS)
PLOTS_DIR = Path("plots")
__all__ = ["DTYPES", "MODES", "PRESET_NAMES", "load_plugins", "resolve_device", "baseline_dir", "methods",
           "environment", "sweep_spec", "resumed_spec", "new_run_dir", "sweep", "latest_run", "load_run", "plot",
           "report", "report_markdown", "compare", "nothing_ran", "fidelity_spec",
           "resumed_fidelity_spec", "fidelity", "quality_spec", "quality"]


def methods(plugins=()) -> list:
    """Every registered method's record (after loading the plugin files given)."""
    from racebench.methods.registry import list_methods

    load_plugins(plugins)
    return list_methods()


def environment() -> dict:
    """What every run records of this machine and its software (run.json's "environment")."""
    from racebench.bench.environment import collect_environment

    return collect_environment()


def sweep_spec(**options):
    """A validated SweepSpec from the sweep's options as the CLI names them (None = not given); see build_spec."""
    from racebench.bench.spec import build_spec

    return build_spec(**options)


def resumed_spec(out: Path | None, options: dict | None = None):
    """The spec stored in the run folder `out`, for --resume. `options` are the sweep options given with it
    (None = not given): any that asks for something other than the run is a UsageError naming it."""
    from racebench.bench.spec import SweepSpec, resume_differences

    if out is None:
        raise UsageError("--resume needs --out: the folder of the run to continue")
    meta = load_meta(out)
    try:
        spec = SweepSpec.from_dict(meta["spec"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{out}/run.json: its spec cannot be read ({type(exc).__name__}: {exc})") from None
    if differences := resume_differences(spec, options or {}):
        raise UsageError(f"--resume continues {out} as recorded; these options differ from it: "
                         f"{'; '.join(differences)}. Leave them out, or start a new run with another --out")
    return spec


def new_run_dir(spec, root: Path = RESULTS_DIR) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{spec.preset}-{spec.device}-{stamp}"


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda where a GPU is present, else cpu; a UsageError for a device this machine lacks."""
    from racebench.bench.spec import resolve_device as resolve

    return resolve(device)


def baseline_dir(device: str = "auto", root: Path = RESULTS_DIR / "baselines") -> Path:
    """Where this machine's CI baseline lives: results/baselines/<device model>, e.g. nvidia-h200."""
    import re

    device = resolve_device(device)
    env = environment()
    model = env["gpu"] if device == "cuda" else f"cpu {env['cpu']}"
    return root / re.sub(r"[^a-z0-9]+", "-", str(model).lower()).strip("-")


def sweep(spec, out: Path, *, resume: bool = False, command: str = "", progress=None):
    """Run a sweep into `out` and return its RunStore; with resume, continue the run stored there (spec from
    resumed_spec(out)). `progress(method, T, row)` is called before (row None) and after each point."""
    from racebench.bench.runner import run_sweep

    return run_sweep(spec, Path(out), resume=resume, command=command, progress=progress)


def fidelity_spec(**options):
    """A validated FidelitySpec from `racebench fidelity`'s options (None = not given); see build_fidelity_spec."""
    from racebench.bench.fidelity import build_fidelity_spec

    return build_fidelity_spec(**options)


def resumed_fidelity_spec(out: Path):
    """The FidelitySpec recorded in the fidelity run folder `out`, for --resume."""
    from racebench.bench.fidelity import stored_spec

    meta = load_meta(out)
    if meta.get("kind") != "fidelity":
        raise UsageError(f"{out} is not a fidelity run (racebench sweep --resume continues a sweep)")
    return stored_spec(meta)


def fidelity(spec, out: Path, *, command: str = "", resume: bool = False, progress=None):
    """Score each method and knob setting of `spec` against exact attention into the run folder `out` (a sweep's
    format, run.json kind "fidelity"); returns its RunStore."""
    from racebench.bench.fidelity_runner import run_fidelity

    return run_fidelity(spec, Path(out), command=command, resume=resume, progress=progress)


def quality_spec(**options):
    """A validated QualitySpec from `racebench quality`'s options (None = not given)."""
    from racebench.quality.runner import build_quality_spec

    return build_quality_spec(**options)


def quality(spec, out: Path, *, command: str = "", progress=None):
    """Train and score MQAR models with each method of `spec` into the run folder `out` (kind "quality")."""
    from racebench.quality.runner import run_quality

    return run_quality(spec, Path(out), command=command, progress=progress)


def nothing_ran(df) -> str | None:
    """Why no point of a sweep's results ran (every one unsupported, failed or skipped), or None if one did."""
    from racebench.results.summary import nothing_ran as why

    return why(df)


def latest_run(root: Path = RESULTS_DIR) -> Path:
    runs = sorted((p.parent for p in root.glob("*/run.json")), key=lambda p: (p / "run.json").stat().st_mtime)
    if not runs:
        raise UsageError(f"no runs under {root}/: run `racebench sweep` first")
    return runs[-1]


def plot(runs: list[Path] | None = None, *, out: Path | None = None, fmt: str = "png", methods: str | None = None,
         title: bool = True, size: str | None = None, style: str = "paper") -> list[Path]:
    """Draw the figures of one or more runs (default: the latest) into `out` (default plots/<run-ids>): `methods`
    a comma-separated selection, `size` 'W,H' in inches, `style` paper or slides."""
    from racebench.views.plots import FORMATS, FigureOptions, parse_size, save_figures

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None
    opts = FigureOptions(style=style, size=parse_size(size), title=title, methods=chosen)
    paths = runs or [latest_run()]
    kinds = {load_meta(p).get("kind", "sweep") for p in paths}
    if len(kinds) > 1:
        raise UsageError(f"plot runs of one kind at a time: these are {', '.join(sorted(kinds))} runs")
    frames = [load_run(p, samples=kinds == {"quality"}) for p in paths]  # a quality run's figures read its curves
    out = out or PLOTS_DIR / "+".join(meta["run_id"] for meta, _ in frames)
    make = {}
    if kinds == {"fidelity"}:
        from racebench.views.fidelity import fidelity_figures

        make = {"make": fidelity_figures}
    elif kinds == {"quality"}:
        from racebench.views.quality import quality_figures

        make = {"make": quality_figures}
    try:
        return save_figures(frames, out, fmt, opts, **make)
    except OSError as exc:
        raise UsageError(f"cannot write figures into {out}: {exc.strerror}") from None


def _report_input(run: Path | None, at: str | None):
    from racebench.bench.units import parse_lengths
    from racebench.views.report import default_lengths

    meta, df = load_run(run or latest_run())
    return meta, df, parse_lengths(at) if at else default_lengths(df)


def report(run: Path | None = None, *, at: str | None = None):
    """(run.json, the per-method summary table at the lengths `at`, race's fastest against the fastest softmax at
    each length, a line per device on their crossover) of a run (default: the latest)."""
    from racebench.views.report import summary_frame, versus_frame

    meta, df, lengths = _report_input(run, at)
    return meta, summary_frame(df, lengths), *versus_frame(df)


def report_markdown(run: Path | None = None, *, at: str | None = None) -> str:
    from racebench.views.report import to_markdown

    return to_markdown(*_report_input(run, at))


def compare(baseline: Path, candidate: Path, *, max_slowdown: str = "10%", max_memory_growth: str = "5%",
            max_threshold_drop: str = "0%", allow_mismatch: bool = False):
    """A candidate run's points against a baseline's (results.compare.Comparison). Limits are tolerated growths:
    '10%' or '1.1x'. Runs from another device model or torch / Triton version are refused (UsageError naming the
    difference) unless allow_mismatch, which records the differences in the comparison."""
    from racebench.bench.units import parse_growth
    from racebench.methods.registry import knob_columns
    from racebench.results.compare import Limits, compare_runs, environment_differences

    limits = Limits(parse_growth(max_slowdown, option="--max-slowdown"),
                    parse_growth(max_memory_growth, option="--max-memory-growth"),
                    parse_growth(max_threshold_drop, option="--max-threshold-drop"))
    (base_meta, base), (cand_meta, cand) = load_run(baseline, samples=True), load_run(candidate, samples=True)
    mismatches = environment_differences(base_meta, cand_meta)
    if mismatches and not allow_mismatch:
        raise UsageError(f"the runs are not comparable ({'; '.join(mismatches)}); --allow-mismatch compares "
                         "them anyway")
    knobs = [*knob_columns(), *base_meta.get("knob_columns", []), *cand_meta.get("knob_columns", [])]
    result = compare_runs(base, cand, limits=limits, knob_columns=knobs, mismatches=mismatches)
    if not (result.points.status_base != "missing").any() or not (result.points.status_cand != "missing").any():
        raise UsageError("one of the runs has no point")
    if not ((result.points.status_base != "missing") & (result.points.status_cand != "missing")).any():
        raise UsageError("the two runs share no point (method, knobs, shape, dtype, device and length)")
    return result
