"""A sweep's progress: one line per finished point, and on a terminal a live bar with an ETA from the predicted
time of the points left. Piped (a CI log), the lines alone, never wrapped."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from racebench.bench.spec import GRACE_S, SweepSpec
from racebench.bench.units import format_length, format_ms
from racebench.results.summary import extrapolate

_STYLE = {"ok": "green", "oom": "red", "timeout": "yellow", "skipped": "dim", "error": "red",
          "nonfinite": "red", "unsupported": "dim"}
_RAN = ("ok", "oom", "timeout", "error", "nonfinite")  # statuses of points that took a process's time


class Eta:
    """Seconds the points left will take: per method, the wall time of its next lengths extrapolated from its last
    two finished points (power law, at least linear, at most the time budget); a method that failed or was never
    run costs nothing more; a method not started yet costs what the started ones' points did on average. Each
    later round (--rounds) costs what the first round's completed points took, less what it has done already."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.walls: dict[str, list[tuple[int, float]]] = {m: [] for m in spec.methods}
        self.stopped: set[str] = set()
        self.done: set[tuple[str, int]] = set()
        self.later_s = 0.0  # wall time of the points of later rounds done so far

    def record(self, method: str, T: int, row: dict, round_: int = 1) -> None:
        if round_ > 1:
            self.later_s += float(row.get("point_wall_s") or 0)
            return
        self.done.add((method, T))
        if row["status"] == "ok" and row.get("point_wall_s") is not None:
            self.walls[method].append((T, float(row["point_wall_s"])))
        elif row["status"] in ("oom", "timeout", "unsupported"):
            self.stopped.add(method)

    def _predict(self, method: str, T: int) -> float:
        cap = self.spec.time_budget_s + GRACE_S  # the runner kills a point's process there
        pts = self.walls[method]
        if not pts:
            every = [w for ws in self.walls.values() for _, w in ws]
            return min(sum(every) / len(every), cap) if every else min(10.0, cap)
        if len(pts) == 1:
            return min(pts[0][1] * T / pts[0][0], cap)
        return min(extrapolate(pts, T), cap)

    def seconds(self) -> float:
        first = sum(self._predict(m, T) for m in self.spec.methods if m not in self.stopped
                    for T in self.spec.lengths if (m, T) not in self.done)
        completed = sum(w for ws in self.walls.values() for _, w in ws)
        return first + max(0.0, (self.spec.rounds - 1) * (completed + first) - self.later_s)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def sweep_progress(spec: SweepSpec, console: Console):
    """Yields a progress callback for run_sweep(method, T, row, round): row None as a point starts, its row when
    done. The bar counts the first round's points, then each later round's."""
    live = console.is_terminal
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=console, transient=False,
                        disable=not live)
    task = progress.add_task("starting", total=len(spec.methods) * len(spec.lengths), eta="")
    seen: set[tuple[str, int]] = set()
    completed: list[tuple[str, int]] = []  # the first round's completed points: what later rounds measure again
    eta = Eta(spec)

    def update(method: str, T: int, row: dict | None, round_: int = 1) -> None:
        if round_ > 1 and completed:  # the first round is over: the bar counts the later rounds' points too
            progress.update(task, total=progress.tasks[0].total + (spec.rounds - 1) * len(completed))
            completed.clear()
        if round_ == 1 and (method, T) not in seen and T not in spec.lengths:  # a --refine point
            progress.update(task, total=progress.tasks[0].total + 1)
        seen.add((method, T))
        which = f" round {round_}/{spec.rounds}" if spec.rounds > 1 else ""
        if row is None:
            progress.update(task, description=f"{method} T={format_length(T)}{which}")
            return
        eta.record(method, T, row, round_)
        status = row["status"]
        if round_ == 1 and status == "ok":
            completed.append((method, T))
        detail = format_ms(row.get("time_ms")) if status == "ok" else (row.get("error") or "")[:80]
        console.print(f"  {method:<14} T={format_length(T):<8} [{_STYLE.get(status, '')}]{status:<11}[/] {detail}"
                      f"{which}", highlight=False, soft_wrap=not live)
        progress.update(task, advance=1, eta=f"about {_clock(eta.seconds())} left")

    with progress:
        yield update
