"""A fidelity run's terminal output (progress, table) and figures: error against time per pass (the Pareto front),
and error over each knob a run varies (over a method's sample knob, race's L, with the knob^(-1/2) law)."""

from __future__ import annotations

import contextlib
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from racebench.bench.units import format_length, format_ms  # noqa: E402
from racebench.methods.registry import get_method  # noqa: E402


def setting_text(row) -> str:
    """The knobs a point varied or fixed (its `setting`), e.g. 'race_L=8 race_beta=1000'; '' for defaults."""
    names = row.get("setting") if isinstance(row, dict) else getattr(row, "setting", None)
    if isinstance(names, str):
        names = [n for n in names.strip("[]").replace("'", "").split(", ") if n]
    get = row.get if isinstance(row, dict) else (lambda k: getattr(row, k, None))
    return " ".join(f"{n}={_num(get(n))}" for n in names or [])


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _pm(mean, std, digits=3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if isinstance(std, float) and not math.isnan(std) and std > 0 else "")


@contextlib.contextmanager
def fidelity_progress(spec, console):
    """A progress callback for run_fidelity(what, row): row None as a draw starts, the point's row when done; on a
    terminal a bar over the draws, piped one line per point."""
    live = console.is_terminal
    total = sum(len(spec.settings(m)) for m in spec.methods) * len(spec.lengths) * len(spec.inputs) * spec.draws
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=not live)
    task = progress.add_task("starting", total=total)

    def update(what: str, row: dict | None) -> None:
        if row is None:
            progress.update(task, description=what, advance=1)
            return
        if row["status"] != "ok":
            detail = f"[red]{row['status']}[/] {(row.get('error') or '')[:80]}"
        else:
            angular = (f", against its target ({row['target']}) {row['err_target']:.3f}"
                       if row.get("err_target") is not None else "")
            timed = f", {format_ms(row['time_ms'])} per pass" if row.get("time_ms") is not None else ""
            detail = (f"error {row['err_softmax']:.3f} against softmax (uniform: {row['floor_softmax']:.3f})"
                      f"{angular}{timed}")
        console.print(f"  {what}: {detail}", highlight=False, soft_wrap=not live)

    with progress:
        yield update


def fidelity_table(df: pd.DataFrame, title: str = "Error against exact attention (relative Frobenius, mean ± sd "
                                                  "over draws)") -> Table:
    records = df.to_dict("records")
    targets = sorted({f"{r['method']}: {r['target']}" for r in records if isinstance(r.get("target"), str)})
    caption = "Targets, the exact attention a method estimates: " + "; ".join(targets) if targets else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for col in ("method", "setting", "T", "inputs", "vs softmax", "uniform's", "row cosine", "KL (nats)",
                "vs its target", "time per pass"):
        table.add_column(col)
    for r in records:
        if r["status"] != "ok":
            table.add_row(r["method"], setting_text(r), format_length(int(r["T"])), str(r.get("inputs")),
                          f"[red]{r['status']}[/]", "", "", "", "", "")
            continue
        table.add_row(r["method"], setting_text(r) or "defaults", format_length(int(r["T"])), str(r["inputs"]),
                      _pm(r.get("err_softmax"), r.get("err_softmax_std")), _pm(r.get("floor_softmax"), None),
                      _pm(r.get("cos_softmax"), None, 4), _pm(r.get("kl_softmax"), None),
                      _pm(r.get("err_target"), r.get("err_target_std")),
                      format_ms(r.get("time_ms")) if _finite(r.get("time_ms")) else "-")
    return table


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fit_slope(xs, ys) -> float:
    """The exponent of a power law through (x, y): the least-squares slope in log-log."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def _style_of(method: str) -> dict:
    m = get_method(method)
    return dict(color=m.color or "black", marker=m.marker or "o")


def pareto_figure(df: pd.DataFrame, opts):
    """Error against softmax over time per pass, every setting a point, one panel per kind of inputs at the
    longest length; the dashed line is uniform attention's error."""
    from racebench.views.plots import _legend_outside, tex_length

    ok = df[(df.status == "ok") & df.time_ms.notna()]
    T = int(ok["T"].max())
    kinds = list(dict.fromkeys(ok.inputs))
    fig, axes = plt.subplots(1, len(kinds), figsize=opts.figsize, layout="constrained", squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        part = ok[(ok["T"] == T) & (ok.inputs == kind)]
        for method, g in part.groupby("method", sort=False):
            g = g.sort_values("time_ms")
            ax.plot(g.time_ms / 1e3, g.err_softmax, linestyle="none", label=method, **_style_of(method))
        ax.axhline(part.floor_softmax.mean(), color="grey", linestyle="--", linewidth=1, label="uniform attention")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("time per forward+backward pass (s, fp32)")
        ax.set_title(f"{kind} inputs", loc="left", fontsize="medium")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("error against softmax (relative Frobenius)")
    _legend_outside(axes[0][-1])
    if opts.title:
        fig.suptitle(f"Error against time per pass at T = {tex_length(T)}", x=0.0, ha="left")
    return fig


def knob_figure(df: pd.DataFrame, knob: str, opts):
    """Each method's error against its target (solid) and against softmax (dashed) over one knob, a line per setting
    of its other knobs, inputs and length. Over a method's sample knob (race's L), the fitted slope is in the legend
    and a dotted knob^(-1/2) line starts at the first point: the law the error should follow."""
    from racebench.views.plots import _legend_outside, _set_title, tex_length

    fig, ax = plt.subplots(figsize=opts.figsize, layout="constrained")
    law = False
    for method, mine in df.groupby("method", sort=False):
        others = [k.name for k in get_method(method).knobs if k.name != knob and k.name in mine]
        varied = [k for k in others if mine[k].nunique() > 1]
        for key, g in mine.groupby([*varied, "inputs", "T"], sort=False, dropna=False):
            g = g.groupby(knob, as_index=False).agg(err=("err_target", "mean"), sd=("err_target_std", "mean"),
                                                   soft=("err_softmax", "mean"))
            if len(g) < 3:
                continue
            fixed = " ".join(f"{k}={_num(v)}" for k, v in zip(varied, key[:len(varied)]))
            label = f"{method} {fixed}, {key[-2]}, T={tex_length(int(key[-1]))}".replace("  ", " ")
            style = _style_of(method)
            if knob == get_method(method).sample_knob:
                label += f": slope {fit_slope(g[knob], g.err):.2f}"
                ax.plot(g[knob], g.err.iloc[0] * (g[knob] / g[knob].iloc[0]) ** -0.5, color=style["color"],
                        linestyle=":", linewidth=1)
                law = True
            ax.errorbar(g[knob], g.err, yerr=g.sd, capsize=2, label=label, **style)
            ax.plot(g[knob], g.soft, linestyle="--", linewidth=1, color=style["color"], marker=style["marker"],
                    markerfacecolor="none")
    ax.plot([], [], color="grey", linestyle="--", label="against softmax")
    if law:
        ax.plot([], [], color="grey", linestyle=":", label=f"{knob}^(-1/2) from the first point")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(knob)
    ax.set_ylabel("error against its target (relative Frobenius)")
    ax.grid(True, which="major", alpha=0.3)
    _set_title(ax, opts, f"Error over {knob}")
    _legend_outside(ax)
    return fig


def fidelity_figures(frames, opts) -> dict:
    """The figures a fidelity run's points support: error against time, and error over each knob that takes 3 or
    more values among the points with a target."""
    from racebench.methods.registry import knob_columns

    df = pd.concat([f for _, f in frames], ignore_index=True)
    if opts.methods:
        df = df[df.method.isin(opts.methods)]
    figures = {}
    ok = df[df.status == "ok"]
    if "time_ms" in ok and ok.time_ms.notna().any():
        figures["fidelity-pareto"] = pareto_figure(df, opts)
    targeted = ok[ok.err_target.notna()] if "err_target" in ok else ok.iloc[:0]
    for knob in knob_columns():
        if knob in targeted and targeted.groupby(["method", "inputs", "T"])[knob].nunique().max() >= 3:
            figures[f"fidelity-{knob}"] = knob_figure(targeted, knob, opts)
    return figures
