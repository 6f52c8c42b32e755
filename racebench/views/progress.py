"""The live progress bar of a sweep."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from racebench.bench.spec import SweepSpec
from racebench.bench.units import format_length, format_ms

_STYLE = {"ok": "green", "oom": "red", "timeout": "yellow", "skipped": "dim", "error": "red",
          "nonfinite": "red", "unsupported": "dim"}


@contextlib.contextmanager
def sweep_progress(spec: SweepSpec, console: Console):
    """Yields a progress callback for run_sweep: points done of total, the current point, elapsed time."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    task = progress.add_task("starting", total=len(spec.methods) * len(spec.lengths))
    seen: set[tuple[str, int]] = set()

    def update(method: str, T: int, row: dict | None) -> None:
        if (method, T) not in seen and T not in spec.lengths:  # a --refine point
            progress.update(task, total=progress.tasks[0].total + 1)
        seen.add((method, T))
        if row is None:
            progress.update(task, description=f"{method} T={format_length(T)}")
            return
        status = row["status"]
        detail = format_ms(row.get("time_ms")) if status == "ok" else (row.get("error") or "")[:80]
        progress.console.print(f"  {method:<14} T={format_length(T):<8} [{_STYLE.get(status, '')}]{status:<11}[/] "
                               f"{detail}", highlight=False)
        progress.advance(task)

    with progress:
        yield update
