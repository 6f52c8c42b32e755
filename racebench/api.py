"""Library functions behind the CLI commands."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from racebench.bench.runner import ProgressFn, run_sweep
from racebench.bench.spec import SweepSpec
from racebench.errors import UsageError
from racebench.results.store import RunStore, load_meta

RESULTS_DIR = Path("results")


def new_run_dir(spec: SweepSpec, root: Path = RESULTS_DIR) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{spec.preset}-{spec.device}-{stamp}"


def resumed_spec(out: Path | None) -> SweepSpec:
    """The spec stored in the run folder `out`, for --resume."""
    if out is None:
        raise UsageError("--resume needs --out: the folder of the run to continue")
    return SweepSpec.from_dict(load_meta(out)["spec"])


def sweep(spec: SweepSpec, out: Path, *, resume: bool = False, command: str = "",
          progress: ProgressFn | None = None) -> RunStore:
    """Run a sweep into `out`; with resume, continue the run stored there (spec from resumed_spec(out))."""
    return run_sweep(spec, out, resume=resume, command=command, progress=progress)


def latest_run(root: Path = RESULTS_DIR) -> Path:
    runs = sorted((p.parent for p in root.glob("*/run.json")), key=lambda p: (p / "run.json").stat().st_mtime)
    if not runs:
        raise UsageError(f"no runs under {root}/: run `racebench sweep` first")
    return runs[-1]
