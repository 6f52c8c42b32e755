"""Run summaries: a rich view for the terminal and a markdown file."""

from __future__ import annotations

import pandas as pd

from racebench.bench.units import format_bytes, format_length, format_ms
from racebench.methods.registry import HEADLINE_FAMILIES, baseline_method
from racebench.results.summary import thresholds, versus_fastest


def summary_frame(df: pd.DataFrame, lengths: list[int]) -> pd.DataFrame:
    """Per method: largest T done, threshold, cause; time, speedup over the baseline method (the record marked
    baseline: flash) and peak / floor at `lengths`."""
    rows = []
    ok = df[df.status == "ok"]
    base = baseline_method()
    for t in thresholds(df).itertuples():
        row = {"method": t.method, "device": t.device, "dtype": t.dtype, "largest T done": format_length(t.max_ok_T),
               "threshold": format_length(t.fail_T), "cause": t.cause if isinstance(t.cause, str) else "-"}
        mine = ok[(ok.method == t.method) & (ok.device == t.device)].set_index("T")
        ref = ok[(ok.method == base) & (ok.device == t.device)].set_index("T")
        for T in lengths:
            n = format_length(T)
            if T in mine.index:
                p = mine.loc[T]
                row[f"time @{n}"] = format_ms(p.time_ms)
                row[f"vs {base} @{n}"] = f"{ref.loc[T].time_ms / p.time_ms:.2g}x" if T in ref.index else "-"
                row[f"peak/floor @{n}"] = (f"{p.peak_mem_bytes / p.floor_bytes:.2f}x ({format_bytes(p.peak_mem_bytes)})"
                                           if pd.notna(p.peak_mem_bytes) else "-")
            else:
                row[f"time @{n}"] = row[f"vs {base} @{n}"] = row[f"peak/floor @{n}"] = "-"
        rows.append(row)
    return pd.DataFrame(rows)


VERSUS_TITLE = "{} against the fastest {} at each length".format(*HEADLINE_FAMILIES)


def versus_frame(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """race's fastest method against the fastest softmax at each length both completed (the best softmax of the run
    at each length, whichever kernel it was), with race's speedup over it; and a line per device on the crossover."""
    subject, other = HEADLINE_FAMILIES
    table, crossings = versus_fastest(df, subject, other)
    several = len(crossings) > 1
    lines = []
    for device, t in crossings.items():
        where = f" on {device}" if several else ""
        if t is not None:
            lines.append(f"{subject} is faster than the fastest {other} from about {round(t):,} tokens{where}.")
            continue
        mine = table[table.device == device]
        if len(mine) and (mine.speedup > 1).all():
            lines.append(f"{subject} is faster than the fastest {other} at every length both completed{where}.")
        elif len(mine):
            lines.append(f"No crossover measured{where}: {subject} is not faster than the fastest {other} up to "
                         f"{format_length(int(mine['T'].max()))}.")
    if table.empty:
        return table, lines
    shown = pd.DataFrame({
        **({"device": table.device} if several else {}),
        "T": table["T"].map(format_length),
        f"fastest {other}": table.other_method + " " + table.other_ms.map(format_ms),
        f"fastest {subject}": table.subject_method + " " + table.subject_ms.map(format_ms),
        f"{subject} speedup": table.speedup.map(lambda x: f"{x:.2g}x"),
    })
    return shown, lines


def default_lengths(df: pd.DataFrame) -> list[int]:
    """Lengths worth reading: the largest the baseline method completed, and the longest completed."""
    done = sorted(df[df.status == "ok"]["T"].unique())
    if not done:
        return []
    ref = df[(df.method == baseline_method()) & (df.status == "ok")]["T"]
    picks = {int(ref.max())} if len(ref) else set()
    picks |= {int(done[-1])}
    return sorted(picks)


def to_markdown(meta: dict, df: pd.DataFrame, lengths: list[int]) -> str:
    table = summary_frame(df, lengths)
    env = meta.get("environment", {})
    spec = meta.get("spec", {})
    lines = [f"# racebench run {meta.get('run_id', '')}", "",
             f"Command: `{meta.get('command', '')}`", "",
             f"Shape: B={spec.get('B')}, H={spec.get('H')}, D={spec.get('D')}, {spec.get('dtype')}, "
             f"{'causal' if spec.get('causal') else 'non-causal'}, {spec.get('mode')}; time budget"
             f" {spec.get('time_budget_s')} s, memory budget {format_bytes(spec.get('memory_budget_bytes'))}",
             "", _markdown_table(table), ""]
    versus, crossings = versus_frame(df)
    if not versus.empty:
        lines += [f"## {VERSUS_TITLE}", "", *crossings, "",
                  _markdown_table(versus), ""]
    lines += ["## Environment", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def _markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(no points)"
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])
