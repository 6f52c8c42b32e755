"""A quality run's terminal output (progress, table) and figures: held-out MQAR accuracy against the number of
key-value pairs per method, and the training loss curves."""

from __future__ import annotations

import contextlib
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from racebench.methods.registry import get_method  # noqa: E402


@contextlib.contextmanager
def quality_progress(spec, console):
    """A progress callback for run_quality(method, T, step, loss, rows): a bar over all training steps with the
    loss on a terminal; one line per trained model, piped or not."""
    live = console.is_terminal
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[loss]}"), console=console, disable=not live)
    task = progress.add_task("starting", total=len(spec.methods) * len(spec.lengths) * spec.steps, loss="")
    done = 0

    def update(method: str, T: int, step: int, loss: float | None, rows: list[dict] | None) -> None:
        nonlocal done
        if rows is None:
            progress.update(task, description=f"{method} T={T}", completed=done + step, loss=f"loss {loss:.3f}")
            return
        done += spec.steps
        progress.update(task, completed=done)
        ok = [r for r in rows if r["status"] == "ok"]
        if ok:
            accs = ", ".join(f"{r['pairs']} pairs {r['accuracy']:.3f}" for r in ok)
            detail = f"accuracy {accs}; loss {ok[0]['final_loss']:.3f}; {ok[0]['train_s']:.0f} s"
        elif rows:
            detail = f"[red]{rows[0]['status']}[/] {(rows[0].get('error') or '')[:80]}"
        else:
            detail = "no pair count fits this length"
        console.print(f"  {method:<12} T={T:<6} {detail}", highlight=False, soft_wrap=not live)

    with progress:
        yield update


def quality_table(df: pd.DataFrame, title: str = "MQAR accuracy on held-out sequences") -> Table:
    """One row per (method, T), a column per pair count."""
    table = Table(title=title, title_justify="left")
    counts = sorted(int(p) for p in df.pairs.dropna().unique())
    for col in ("method", "T", *[f"{p} pairs" for p in counts], "final loss", "train time"):
        table.add_column(col)
    for (method, T), g in df.groupby(["method", "T"], sort=False):
        by = {int(r["pairs"]): r for r in g.to_dict("records")}
        cells = []
        for p in counts:
            r = by.get(p)
            cells.append("-" if r is None else f"{r['accuracy']:.3f}" if r["status"] == "ok" else r["status"])
        first = g.iloc[0]
        loss = first.get("final_loss")
        table.add_row(method, str(int(T)), *cells, f"{loss:.3f}" if _finite(loss) else "-",
                      f"{first['train_s']:.0f} s" if _finite(first.get("train_s")) else "-")
    return table


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _style(method: str) -> dict:
    m = get_method(method)
    return dict(color=m.color or "black", marker=m.marker or "o")


def _per_length(ok: pd.DataFrame, opts, draw, *, xlabel: str, ylabel: str, title: str):
    """A panel per length, shared y axis: draw(ax, the length's rows) fills it; one legend, outside."""
    from racebench.views.plots import _legend_outside

    lengths = sorted(int(t) for t in ok["T"].unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=opts.figsize, layout="constrained", squeeze=False,
                             sharey=True)
    for ax, T in zip(axes[0], lengths):
        draw(ax, ok[ok["T"] == T])
        ax.set_xlabel(xlabel)
        ax.set_title(f"T = {T}", loc="left", fontsize="medium")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    _legend_outside(axes[0][-1])
    if opts.title:
        fig.suptitle(title, x=0.0, ha="left")
    return fig


def accuracy_figure(df: pd.DataFrame, opts):
    """Held-out accuracy against key-value pairs, a panel per length, a line per method."""

    def draw(ax, rows):
        for method, g in rows.groupby("method", sort=False):
            g = g.sort_values("pairs")
            ax.plot(g.pairs, g.accuracy, label=method, **_style(method))
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)

    return _per_length(df[df.status == "ok"], opts, draw, xlabel="key-value pairs",
                       ylabel="MQAR accuracy (held out)", title="Associative recall learned with each attention")


def loss_figure(df: pd.DataFrame, opts):
    """Training loss per step, a panel per length (a running mean over 25 steps)."""

    def draw(ax, rows):
        for r in rows.to_dict("records"):
            losses = pd.Series(r["losses"]).rolling(25, min_periods=1).mean()
            ax.plot(losses.index + 1, losses, label=r["method"], color=_style(r["method"])["color"])
        ax.set_yscale("log")

    ok = df[(df.status == "ok") & df.losses.notna()].drop_duplicates(["method", "T"])
    return _per_length(ok, opts, draw, xlabel="training step", ylabel="loss on the answers",
                       title="MQAR training loss")


def quality_figures(frames, opts) -> dict:
    df = pd.concat([f for _, f in frames], ignore_index=True)
    if opts.methods:
        df = df[df.method.isin(opts.methods)]
    if not (df.status == "ok").any():
        return {}
    figures = {"quality-accuracy": accuracy_figure(df, opts)}
    if "losses" in df:
        figures["quality-loss"] = loss_figure(df, opts)
    return figures
