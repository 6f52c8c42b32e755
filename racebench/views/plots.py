"""Figures of one or more runs: time and peak memory against context length, largest context, speedup."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex, to_rgba  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from racebench.bench.units import format_bytes, format_length  # noqa: E402
from racebench.methods.registry import baseline_method, list_methods  # noqa: E402
from racebench.results.summary import thresholds  # noqa: E402

FORMATS = ("png", "svg", "pdf")
_CAUSE_MARKER = {"OOM": "X", "time-out": "v", "time-out (predicted)": "v"}
# What each threshold marker means, told once in a legend of its own: text beside every marker collided where
# several methods stop at the same length.
_CAUSE_LEGEND = {"time-out": "time-out (first pass)", "time-out (predicted)": "time-out (predicted, faint)",
                 "OOM": "out of memory"}


def growth_exponent(ok: pd.DataFrame) -> float | None:
    """Slope of log time against log T over the completed lengths within 16x of the longest, where fixed
    overheads no longer dominate (about 1 for linear methods, about 2 for softmax). A GPU pass has a floor of
    a few milliseconds up to ~2^16 tokens, so a wider window bends the slope (causal flash on an H200: 1.1 over
    2^10..2^16, 1.5 over 2^12..2^16, 1.85 from 2^14 to 2^16)."""
    ok = ok.sort_values("T")
    ok = ok[ok["T"] >= ok["T"].max() / 16]
    if len(ok) < 2:
        return None
    return float(np.polyfit(np.log(ok["T"].astype(float)), np.log(ok["time_ms"].astype(float)), 1)[0])


def _colors(df: pd.DataFrame) -> dict:
    """One colour per (method, device), the same in every panel: the method record's colour for its first device,
    then colours its record does not take (a plugin's method without one, a second device)."""
    records = {m.name: to_hex(m.color) for m in list_methods() if m.color}
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
    return dict(marker=_CAUSE_MARKER[cause], ms=11, color=color, mfc=face, mew=2)


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


def _style(ax, xlabel="context length T (tokens)"):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: format_length(x)))


def time_figure(df: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    several = df.device.nunique() > 1
    th = thresholds(df).set_index(["method", "device"])
    colors = _colors(df)
    causes = set()
    for key, g in df.groupby(["method", "device"], sort=False):
        ok = g[g.status == "ok"].sort_values("T")
        if ok.empty:
            continue
        k = growth_exponent(ok)
        label = _label(key, several) + (f"  (T^{k:.2f})" if k is not None else "")
        ax.plot(ok["T"], ok["time_ms"] / 1e3, marker="o", ms=4, label=label, color=colors[key])
        t = th.loc[key] if key in th.index else None
        if t is not None and isinstance(t.get("cause"), str) and t.cause in _CAUSE_MARKER and pd.notna(t.fail_T):
            y = _threshold_y(g, t.fail_T, ok)
            ax.plot([t.fail_T], [y], ls="none", gid=f"threshold:{key[0]}:{t.cause}",
                    **_threshold_style(t.cause, colors[key]))
            causes.add(t.cause)
    ax.set_ylabel("time per forward+backward pass (s)" if "fwd+bwd" in set(df["mode"]) else "time per pass (s)")
    ax.set_title(_title("Time against context length", df))
    ax.add_artist(ax.legend(fontsize=8, loc="upper left"))
    if shown := [c for c in _CAUSE_LEGEND if c in causes]:
        marks = [Line2D([], [], ls="none", **_threshold_style(c, "0.3")) for c in shown]
        ax.legend(marks, [_CAUSE_LEGEND[c] for c in shown], fontsize=8, loc="lower right",
                  title="first length not done", title_fontsize=8)
    _style(ax)
    return fig


def memory_figure(df: pd.DataFrame, budgets: dict[str, int]):
    fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
    several = df.device.nunique() > 1
    colors = _colors(df)
    for key, g in df.groupby(["method", "device"], sort=False):
        ok = g[(g.status == "ok") & g.peak_mem_bytes.notna()].sort_values("T")
        if not ok.empty:
            ax.plot(ok["T"], ok["peak_mem_bytes"] / 2**30, marker="o", ms=4, label=_label(key, several),
                    color=colors[key])
    floor = df[["T", "floor_bytes"]].dropna().drop_duplicates("T").sort_values("T")
    if not floor.empty:
        ax.plot(floor["T"], floor["floor_bytes"] / 2**30, "k--", lw=1.5, label="floor: q, k, v, o, dq, dk, dv",
                gid="floor")
    # Largest first, labels alternately above and below their lines: two close budgets' labels stay apart.
    for i, (device, budget) in enumerate(sorted(budgets.items(), key=lambda item: -item[1])):
        ax.axhline(budget / 2**30, color="red", lw=1, ls=":", gid=f"budget:{device}")
        ax.annotate(f"memory budget ({device}): {format_bytes(budget)}", (0.99, budget / 2**30),
                    xycoords=("axes fraction", "data"), fontsize=8, color="red", va="top" if i % 2 else "bottom",
                    ha="right")
    ax.set_ylabel("peak memory, inputs included (GiB)")
    ax.set_title(_title("Peak memory against context length", df))
    ax.legend(fontsize=8, loc="center left")
    _style(ax)
    return fig


def context_figure(df: pd.DataFrame):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    several = df.device.nunique() > 1
    th = thresholds(df).dropna(subset=["max_ok_T"]).sort_values("max_ok_T")
    labels = [_label((r.method, r.device), several) for r in th.itertuples()]
    colors = _colors(df)
    bars = left.barh(labels, th.max_ok_T.astype(float), color=[colors[(r.method, r.device)] for r in th.itertuples()])
    for bar, r in zip(bars, th.itertuples()):
        cause = f"  {format_length(r.max_ok_T)}" + (f" (next: {r.cause})" if isinstance(r.cause, str) else "")
        left.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, cause, va="center", fontsize=8)
    left.set_xscale("log", base=2)
    if len(th):
        left.set_xlim(th.max_ok_T.min() / 2, th.max_ok_T.max() * 64)  # room for the labels
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: format_length(x)))
    left.set_xlabel("largest context completed (tokens)")
    left.set_title("Largest context completed")
    ok = df[df.status == "ok"]
    base = baseline_method()
    for device, g in ok.groupby("device"):
        ref = g[g.method == base].set_index("T")["time_ms"]
        for method, m in g[g.method != base].groupby("method", sort=False):
            m = m.set_index("T")["time_ms"]
            common = m.index.intersection(ref.index).sort_values()
            if len(common):
                right.plot(common, ref[common] / m[common], marker="o", ms=4, label=_label((method, device), several),
                           color=colors[(method, device)])
    right.axhline(1, color="k", lw=1)
    right.set_ylabel(f"speedup over {base} ({base} time / method time)")
    right.set_title(f"Speedup over {base} at each length")
    _style(right)
    if right.lines[:-1]:
        right.legend(fontsize=8)
    fig.suptitle(_title("Context and speed", df).replace("\n", ": ", 1).replace("Context and speed: ", ""), fontsize=10)
    return fig


def make_figures(frames: list[tuple[dict, pd.DataFrame]]) -> dict[str, plt.Figure]:
    pairs = [set(zip(f.method, f.device)) for _, f in frames]
    if sum(map(len, pairs)) > len(set().union(*pairs)):
        # A method measured on one device in several runs: its curves are told apart by run id. (Runs that
        # split the methods of one device, as scripts/gpu-check.sh does, share the device's name.)
        frames = [(meta, f.assign(device=f.device + ":" + meta["run_id"])) for meta, f in frames]
    df = pd.concat([f for _, f in frames], ignore_index=True)
    return {"time": time_figure(df), "memory": memory_figure(df, _budgets(frames)), "context": context_figure(df)}


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


def save_figures(frames: list[tuple[dict, pd.DataFrame]], out_dir: Path, fmt: str = "png") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in make_figures(frames).items():
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        paths.append(path)
    return paths
