"""Figures of one or more runs: time and peak memory against context length, the largest context and speedup, and
the headline figure (the subject family's fastest method against the fastest softmax, with their crossover).

Every method keeps the colour and marker of its record in every figure; lengths read as 2^{12}; the spread of the
timed passes is a band; legends sit outside the axes; styles `paper` (the default: small type, 300 dpi) and
`slides`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex, to_rgba  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from racebench.bench.units import format_bytes  # noqa: E402
from racebench.errors import UsageError  # noqa: E402
from racebench.methods.registry import HEADLINE_FAMILIES, baseline_method, list_methods  # noqa: E402
from racebench.results.summary import crossover, family_members, fastest, thresholds  # noqa: E402

FORMATS = ("png", "svg", "pdf")
_BASE_RC = {"axes.titlesize": "medium", "legend.frameon": False, "axes.spines.top": False,
            "axes.spines.right": False, "savefig.bbox": "tight", "savefig.pad_inches": 0.05}
STYLES = {
    # The x tick labels sit a little lower, and titles a little higher, than matplotlib's defaults: the y tick
    # labels at the axes' corners reach half their height past them.
    "paper": dict(size=(6.5, 4.0), dpi=300, rc=_BASE_RC | {
        "font.size": 8, "legend.fontsize": 7, "lines.linewidth": 1.4, "lines.markersize": 4, "xtick.major.pad": 6,
        "axes.titlepad": 10}),
    "slides": dict(size=(11.0, 6.5), dpi=150, rc=_BASE_RC | {
        "font.size": 15, "legend.fontsize": 13, "lines.linewidth": 2.6, "lines.markersize": 8, "xtick.major.pad": 11,
        "axes.titlepad": 16}),
}
_CAUSE_MARKER = {"OOM": "X", "time-out": "v", "time-out (predicted)": "v"}
# What each threshold marker means, told once in a legend of its own.
_CAUSE_LEGEND = {"time-out": "time-out (first pass)", "time-out (predicted)": "time-out (predicted, faint)",
                 "OOM": "out of memory"}
# Why a method's largest completed length is where it is (the context panel).
_STOP = {"OOM": "out of memory", "time-out": "time-out", "time-out (predicted)": "time-out predicted",
         "error": "error", "nonfinite": "NaN/Inf", "unsupported": "unsupported"}
_BUDGET_STYLES = (":", "-.", (0, (1, 3)), (0, (5, 2, 1, 2)))
_FALLBACK_MARKERS = ("o", "s", "^", "D", "v", "P", "*", "h", "<", ">", "p", "X", "d")
FIT_WINDOW = 16  # the growth exponent is fitted over the completed lengths within this factor of the longest


@dataclass(frozen=True)
class FigureOptions:
    style: str = "paper"
    size: tuple[float, float] | None = None  # inches; None: the style's
    title: bool = True
    methods: tuple[str, ...] | None = None  # None: every method of the runs

    def __post_init__(self):
        if self.style not in STYLES:
            raise UsageError(f"--style must be one of {', '.join(STYLES)}, not {self.style!r}")

    @property
    def figsize(self) -> tuple[float, float]:
        return self.size or STYLES[self.style]["size"]


def parse_size(text: str | None) -> tuple[float, float] | None:
    """'6.5,4' -> (6.5, 4.0) inches."""
    if text is None:
        return None
    try:
        w, h = (float(x) for x in str(text).split(","))
    except ValueError:
        raise UsageError(f"--size takes width,height in inches, e.g. 6.5,4; not {text!r}") from None
    if not (0.5 <= w <= 50 and 0.5 <= h <= 50):
        raise UsageError(f"--size: width and height between 0.5 and 50 inches, not {text!r}")
    return w, h


def tex_length(T: float) -> str:
    """A length as mathtext: 2^{12} for powers of two, else 5,000."""
    if T is None or T != T or T <= 0:
        return "-"
    e = math.log2(T)
    return f"$2^{{{round(e)}}}$" if abs(e - round(e)) < 1e-9 else f"{round(T):,}"


def growth_fit(ok: pd.DataFrame) -> tuple[float, int, int] | None:
    """(slope of log time against log T, first and last length of the fit) over the completed lengths within
    FIT_WINDOW of the longest, where fixed overheads no longer dominate (about 1 for linear methods, about 2 for
    softmax). A GPU pass has a floor of a few milliseconds up to ~2^16 tokens, so a wider window bends the slope
    (causal flash on an H200: 1.1 over 2^10..2^16, 1.5 over 2^12..2^16, 1.85 from 2^14 to 2^16)."""
    ok = ok.sort_values("T")
    ok = ok[ok["T"] >= ok["T"].max() / FIT_WINDOW]
    if len(ok) < 2:
        return None
    k = float(np.polyfit(np.log(ok["T"].astype(float)), np.log(ok["time_ms"].astype(float)), 1)[0])
    return k, int(ok["T"].iloc[0]), int(ok["T"].iloc[-1])


def growth_exponent(ok: pd.DataFrame) -> float | None:
    fit = growth_fit(ok)
    return None if fit is None else fit[0]


def _records() -> dict:
    return {m.name: m for m in list_methods()}


def _colors(df: pd.DataFrame) -> dict:
    """One colour per (method, device), the same in every figure and run: the method record's colour for its first
    device, then colours no record takes (a plugin's method without one, a second device)."""
    records = {name: to_hex(m.color) for name, m in _records().items() if m.color}
    cycle = [to_hex(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    cycle = [c for c in cycle if c not in records.values()] or cycle
    colors, used = {}, set()
    for key in dict.fromkeys(zip(df.method, df.device)):
        color = records.get(key[0])
        if color is None or color in used:
            color = next((c for c in cycle if c not in used), cycle[len(colors) % len(cycle)])
        colors[key] = color
        used.add(color)
    return colors


def _markers(df: pd.DataFrame) -> dict:
    """One marker per method (its record's), the same for all its devices."""
    records = {name: m.marker for name, m in _records().items() if m.marker}
    spare = [m for m in _FALLBACK_MARKERS if m not in records.values()] or list(_FALLBACK_MARKERS)
    markers = {}
    for method in dict.fromkeys(df.method):
        markers[method] = records.get(method) or spare[len([m for m in markers if m not in records]) % len(spare)]
    return {key: markers[key[0]] for key in zip(df.method, df.device)}


def _threshold_y(g: pd.DataFrame, T: int, ok: pd.DataFrame) -> float:
    """Where to draw a threshold: the failed point's measured first pass or predicted time, else the last done."""
    row = g[g["T"] == T].iloc[0]
    for col in ("time_ms", "predicted_ms"):
        if col in row and pd.notna(row[col]):
            return row[col] / 1e3
    return ok["time_ms"].iloc[-1] / 1e3


def _threshold_style(cause: str, color) -> dict:
    """An open marker in the method's colour; a predicted time-out (never run) faintly filled."""
    face = to_rgba(color, 0.25) if cause == "time-out (predicted)" else "none"
    return dict(marker=_CAUSE_MARKER[cause], ms=plt.rcParams["lines.markersize"] * 2.2, color=color, mfc=face, mew=1.5)


def _label(row_key: tuple, several_devices: bool) -> str:
    method, device = row_key
    return f"{method} ({device})" if several_devices else method


def _title(what: str, df: pd.DataFrame) -> str:
    parts = []
    for col, fmt in (("device", "{}"), ("dtype", "{}"), ("B", "B={}"), ("H", "H={}"), ("D", "D={}"),
                     ("causal", "{}"), ("mode", "{}")):
        values = sorted({str(v) for v in df[col].dropna()})
        if col == "causal":
            values = ["causal" if v == "True" else "non-causal" for v in values]
        if col == "device" and len(values) > 1:  # named in the legend; run ids would overflow the title
            values = [f"{len(values)} devices or runs"]
        parts.append(fmt.format("/".join(values)))
    return f"{what}\n" + ", ".join(parts)


def _length_axis(axis) -> None:
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: tex_length(x)))


def _ticks(ax) -> None:
    """The style's tick sizes and padding, fixed now: ticks are made when drawn, perhaps outside the style's rc."""
    size = plt.rcParams["font.size"]
    ax.tick_params(axis="both", which="both", labelsize=size)
    ax.tick_params(axis="x", which="both", pad=plt.rcParams["xtick.major.pad"])


def _style(ax, xlabel="context length T (tokens)"):
    _ticks(ax)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, which="major", alpha=0.3)
    _length_axis(ax.xaxis)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2, numticks=8))  # every 2nd power when crowded


def _legend_outside(ax, handles=None, labels=None, *, loc="upper left", y=1.0, **kw):
    """A legend to the right of the axes, where it hides no data."""
    args = () if handles is None else (handles, labels)
    return ax.legend(*args, loc=loc, bbox_to_anchor=(1.02, y), borderaxespad=0, alignment="left", **kw)


_TIME_LABELS = {"fwd+bwd": "time per forward+backward pass (s)", "fwd": "time per forward pass (s)",
                "bwd": "time per backward pass (s)", "prefill": "prefill time (s)",
                "decode": "decode time per token (s)"}


def _time_label(df: pd.DataFrame) -> str:
    modes = sorted(set(df["mode"].dropna()))
    return _TIME_LABELS.get(modes[0], "time per pass (s)") if len(modes) == 1 else "time per pass (s)"


def _lines(ax, df: pd.DataFrame, column: str, unit: float) -> None:
    """One line per (method, device) of `column` / unit over the completed points, in the method's colour and marker."""
    several = df.device.nunique() > 1
    colors, markers = _colors(df), _markers(df)
    for key, g in df.groupby(["method", "device"], sort=False):
        ok = g[(g.status == "ok") & g[column].notna()].sort_values("T")
        if not ok.empty:
            ax.plot(ok["T"], ok[column] / unit, marker=markers[key], label=_label(key, several), color=colors[key])


def state_figure(df: pd.DataFrame, opts: FigureOptions = FigureOptions()):
    """Inference: the bytes of each method's state or cache against the context length (race's is fixed, a softmax
    K, V cache grows with the context)."""
    fig, ax = plt.subplots(figsize=opts.figsize, layout="constrained")
    _lines(ax, df, "state_bytes", 2**20)
    ax.set_ylabel("state or K, V cache after decoding (MiB)")
    _set_title(ax, opts, _title("Inference state against context length", df))
    _legend_outside(ax)
    _style(ax)
    return fig


def _ok(g: pd.DataFrame) -> pd.DataFrame:
    return g[(g.status == "ok") & g.time_ms.notna()].sort_values("T")


def _set_title(ax, opts: FigureOptions, text: str) -> None:
    if opts.title:  # left-aligned: a title wider than its axes then never runs over the y tick labels
        ax.set_title(text, loc="left")


def time_figure(df: pd.DataFrame, opts: FigureOptions = FigureOptions()):
    fig, ax = plt.subplots(figsize=opts.figsize, layout="constrained")
    several = df.device.nunique() > 1
    th = thresholds(df).set_index(["method", "device"])
    colors, markers = _colors(df), _markers(df)
    causes = set()
    for key, g in df.groupby(["method", "device"], sort=False):
        ok = _ok(g)
        if ok.empty:
            continue
        fit = growth_fit(ok)
        label = _label(key, several) + (f"  $T^{{{fit[0]:.2f}}}$ over {tex_length(fit[1])}–{tex_length(fit[2])}"
                                        if fit else "")
        ax.plot(ok["T"], ok["time_ms"] / 1e3, marker=markers[key], label=label, color=colors[key])
        spread = ok[ok.time_ms_min.notna() & ok.time_ms_max.notna()]
        if len(spread):  # min to max of the timed passes
            ax.fill_between(spread["T"], spread["time_ms_min"] / 1e3, spread["time_ms_max"] / 1e3,
                            color=colors[key], alpha=0.2, lw=0, gid=f"spread:{key[0]}")
        t = th.loc[key] if key in th.index else None
        if t is not None and isinstance(t.get("cause"), str) and t.cause in _CAUSE_MARKER and pd.notna(t.fail_T):
            y = _threshold_y(g, t.fail_T, ok)
            ax.plot([t.fail_T], [y], ls="none", gid=f"threshold:{key[0]}:{t.cause}",
                    **_threshold_style(t.cause, colors[key]))
            causes.add(t.cause)
    ax.set_ylabel(_time_label(df))
    _set_title(ax, opts, _title("Time against context length", df))
    ax.add_artist(_legend_outside(ax, title="method: growth $T^k$, fitted over"))
    shown = [c for c in _CAUSE_LEGEND if c in causes]
    marks = [Line2D([], [], ls="none", **_threshold_style(c, "0.3")) for c in shown]
    band = Patch(color="0.3", alpha=0.2, lw=0)
    _legend_outside(ax, [*marks, band], [*(_CAUSE_LEGEND[c] for c in shown), "min to max of the timed passes"],
                    loc="lower left", y=0.0, title="first length not done" if shown else None)
    _style(ax)
    return fig


def memory_figure(df: pd.DataFrame, budgets: dict[str, int], opts: FigureOptions = FigureOptions()):
    fig, ax = plt.subplots(figsize=opts.figsize, layout="constrained")
    _lines(ax, df, "peak_mem_bytes", 2**30)
    floor = df[df.status == "ok"][["T", "floor_bytes"]].dropna().drop_duplicates("T").sort_values("T")  # data's span
    if not floor.empty:
        ax.plot(floor["T"], floor["floor_bytes"] / 2**30, "k--", lw=1.2, label="floor: q, k, v, o, dq, dk, dv",
                gid="floor")
    # Budgets in the legend, not beside their lines: labels there overlapped each other and the floor.
    for i, (device, budget) in enumerate(sorted(budgets.items(), key=lambda item: -item[1])):
        ax.axhline(budget / 2**30, color="red", lw=1, ls=_BUDGET_STYLES[i % len(_BUDGET_STYLES)],
                   gid=f"budget:{device}", label=f"memory budget ({device}): {format_bytes(budget)}")
    ax.set_ylabel("peak memory, inputs included (GiB)")
    _set_title(ax, opts, _title("Peak memory against context length", df))
    _legend_outside(ax)
    _style(ax)
    return fig


def _stop_reason(r, g: pd.DataFrame) -> str:
    """Why a method's largest completed length is its largest: what failed next, or the sweep's end."""
    if isinstance(r.cause, str):
        return _STOP.get(r.cause, r.cause)
    return "end of the sweep" if (g.status == "ok").all() or g["T"].max() == r.max_ok_T else "-"


def context_figure(df: pd.DataFrame, opts: FigureOptions = FigureOptions()):
    w, h = opts.figsize
    fig, (left, right) = plt.subplots(1, 2, figsize=(w * 1.6, h), layout="constrained")
    several = df.device.nunique() > 1
    th = thresholds(df).dropna(subset=["max_ok_T"]).sort_values("max_ok_T")
    labels = [_label((r.method, r.device), several) for r in th.itertuples()]
    colors = _colors(df)
    bars = left.barh(labels, th.max_ok_T.astype(float), color=[colors[(r.method, r.device)] for r in th.itertuples()])
    groups = dict(iter(df.groupby(["method", "device"], sort=False)))
    for bar, r in zip(bars, th.itertuples()):
        reason = _stop_reason(r, groups[(r.method, r.device)])
        left.annotate(f"{tex_length(r.max_ok_T)}, then {reason}" if reason != "end of the sweep"
                      else f"{tex_length(r.max_ok_T)}, the sweep's end", (1.0, bar.get_y() + bar.get_height() / 2),
                      xycoords=("axes fraction", "data"), xytext=(4, 0), textcoords="offset points", va="center",
                      annotation_clip=False, gid=f"stop:{r.method}")
    left.set_xscale("log", base=2)
    if len(th):
        left.set_xlim(th.max_ok_T.min() / 4, th.max_ok_T.max() * 1.5)  # ends at the data
    _length_axis(left.xaxis)
    _ticks(left)
    left.set_xlabel("largest context completed (tokens), and what stopped it")
    left.spines["right"].set_visible(False)
    _set_title(left, opts, "Largest context completed")
    ok = df[df.status == "ok"]
    base = baseline_method()
    markers = _markers(df)
    for device, g in ok.groupby("device"):
        ref = g[g.method == base].set_index("T")["time_ms"]
        for method, m in g[g.method != base].groupby("method", sort=False):
            m = m.set_index("T")["time_ms"]
            common = m.index.intersection(ref.index).sort_values()
            if len(common):
                right.plot(common, ref[common] / m[common], marker=markers[(method, device)],
                           label=_label((method, device), several), color=colors[(method, device)])
    right.axhline(1, color="k", lw=1)
    right.set_ylabel(f"speedup over {base} ({base} time / method time)")
    _set_title(right, opts, f"Speedup over {base} at each length")
    _style(right)
    if right.lines[:-1]:
        _legend_outside(right)
    if opts.title:
        fig.suptitle(_title("", df).strip())
    return fig


def _family_best(df: pd.DataFrame, family: str) -> pd.DataFrame:
    """At each length, the fastest completed point among the family's methods: T, time_ms, method."""
    return fastest(df, family_members(family))


def headline_figure(df: pd.DataFrame, opts: FigureOptions = FigureOptions()):
    """Time against length: the fastest of the subject family and the fastest softmax at each length, their
    crossover, and how far each got (and what stopped it). Every word sits in the legend, outside the data."""
    subject, other = HEADLINE_FAMILIES
    fig, ax = plt.subplots(figsize=opts.figsize, layout="constrained")
    th = thresholds(df)
    records = _records()
    several = df.device.nunique() > 1
    for i, device in enumerate(dict.fromkeys(df.device)):
        d = df[df.device == device]
        curves = {}
        for family, marker in ((subject, "o"), (other, "s")):
            best = _family_best(d, family)
            if best.empty:
                continue
            curves[family] = best
            color = next((m.color for m in records.values() if m.family == family and m.color), None)
            members = th[(th.device == device) & th.method.isin({n for n, r in records.items() if r.family == family})]
            last = members.loc[members.max_ok_T.idxmax()]
            reason = _STOP.get(last.cause, last.cause) if isinstance(last.cause, str) else "the sweep's end"
            name = (f"fastest {family} ({', '.join(dict.fromkeys(best.method))})" + (f", {device}" if several else "")
                    + f"\nlargest {tex_length(last.max_ok_T)}, then {reason}")
            ax.plot(best["T"], best.time_ms / 1e3, ls="-" if i == 0 else "--", marker=marker, color=color, label=name,
                    gid=f"best:{family}:{device}")
        if subject in curves and other in curves:
            t = crossover(curves[subject], curves[other])
            common = sorted(set(curves[subject]["T"]) & set(curves[other]["T"]))
            if t is not None:
                ax.axvline(t, color="0.4", lw=1, ls=":", gid=f"crossover:{device}",
                           label=f"crossover at about {round(t):,} tokens" + (f", {device}" if several else ""))
            elif common:
                faster = subject if (curves[subject].set_index("T").time_ms[common]
                                     < curves[other].set_index("T").time_ms[common]).all() else None
                text = (f"{subject} faster at every length both ran ({tex_length(common[0])}–{tex_length(common[-1])})"
                        if faster else f"no crossover measured up to {tex_length(common[-1])}")
                ax.plot([], [], ls="none", label=text + (f", {device}" if several else ""))
    ax.set_ylabel(_time_label(df))
    _set_title(ax, opts, _title(f"{subject} against the fastest {other}", df))
    _legend_outside(ax)
    _style(ax)
    return fig


def make_figures(frames: list[tuple[dict, pd.DataFrame]], opts: FigureOptions = FigureOptions()) -> dict:
    pairs = [set(zip(f.method, f.device)) for _, f in frames]
    if sum(map(len, pairs)) > len(set().union(*pairs)):
        # A method measured on one device in several runs: its curves are told apart by run id. (Runs that
        # split the methods of one device, as scripts/gpu-check.sh does, share the device's name.)
        frames = [(meta, f.assign(device=f.device + ":" + meta["run_id"])) for meta, f in frames]
    df = pd.concat([f for _, f in frames], ignore_index=True)
    if opts.methods:
        unknown = [m for m in opts.methods if m not in set(df.method)]
        if unknown:
            raise UsageError(f"--methods: {', '.join(unknown)} not in these runs (they hold "
                             f"{', '.join(dict.fromkeys(df.method))})")
        df = df[df.method.isin(opts.methods)]
    with plt.rc_context(STYLES[opts.style]["rc"]):
        figures = {"time": time_figure(df, opts), "memory": memory_figure(df, _budgets(frames), opts),
                   "context": context_figure(df, opts)}
        if all(_family_best(df, family).shape[0] for family in HEADLINE_FAMILIES):
            figures["headline"] = headline_figure(df, opts)
        if "state_bytes" in df and df.state_bytes.notna().any():
            figures["state"] = state_figure(df, opts)
    return figures


def _budgets(frames) -> dict[str, int]:
    """Memory budget by device, or by device and run where the runs on one device had different budgets."""
    by_device: dict[str, dict[str, int]] = {}
    for meta, f in frames:
        device = f.device.iloc[0] if len(f) else meta["spec"]["device"]
        by_device.setdefault(device, {})[meta["run_id"]] = meta["spec"]["memory_budget_bytes"]
    budgets = {}
    for device, runs in by_device.items():
        if len(set(runs.values())) == 1:
            budgets[device] = next(iter(runs.values()))
        else:
            budgets |= {f"{device}, {run}": budget for run, budget in runs.items()}
    return budgets


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of drawn, non-empty text objects whose boxes intersect (tick labels, legends, titles, annotations)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hidden = set()  # labels of ticks outside the view: kept by matplotlib, not drawn
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo <= tick.get_loc() <= hi:
                    hidden |= {id(tick.label1), id(tick.label2)}
    boxes = []
    for t in fig.findobj(Text):
        if not t.get_visible() or not t.get_text().strip() or id(t) in hidden:
            continue
        box = t.get_window_extent(renderer)
        if box.width > 0 and box.height > 0 and fig.bbox.overlaps(box):
            boxes.append((t.get_text(), box))
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


def save_figures(frames: list[tuple[dict, pd.DataFrame]], out_dir: Path, fmt: str = "png",
                 opts: FigureOptions = FigureOptions(), make=make_figures) -> list[Path]:
    """Draw `make(frames, opts)`'s figures (a sweep's by default) into out_dir as name.fmt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context(STYLES[opts.style]["rc"]):
        for name, fig in make(frames, opts).items():
            path = out_dir / f"{name}.{fmt}"
            fig.savefig(path, dpi=STYLES[opts.style]["dpi"])
            plt.close(fig)
            paths.append(path)
    return paths
