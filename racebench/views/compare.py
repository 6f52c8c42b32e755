"""compare's output: a rich table for the terminal, markdown for a pull request or $GITHUB_STEP_SUMMARY, JSON for
bots."""

from __future__ import annotations

import json
import math

from rich.table import Table

from racebench.bench.units import format_length, format_ms

FORMATS = ("table", "markdown", "json")
_ORDER = {"regression": 0, "improvement": 1, "changed": 2, "same": 3}


def verdict(comparison) -> str:
    """One sentence: the outcome, how many points, against which limits."""
    c, n = comparison, len(comparison.points)
    bad, good = len(c.regressions), len(c.improvements)
    limits = (f"time over {1 + c.limits.time:.2f}x at 95% confidence, memory over {1 + c.limits.memory:.2f}x, "
              f"largest length down by more than {c.limits.threshold:.0%}")
    head = f"{bad} regression{'s' if bad != 1 else ''}" if bad else "No regression"
    sentence = f"{head} in {n} points ({good} improved; limits: {limits})."
    if c.points.samples.isin(["passes", "medians"]).any():  # one process a side: its passes understate the noise
        sentence += (" Some points were judged on one process per run, whose passes understate how much processes "
                     "differ: record both runs with --rounds (the ci presets do).")
    return sentence


def _rows(comparison):
    points = comparison.points.assign(order=comparison.points.kind.map(_ORDER))
    return points.sort_values(["order", "method", "T"], kind="stable")


def _cells(r) -> list[str]:
    ratio = "-" if not _finite(r.time_ratio) else (
        f"{r.time_ratio:.2f}x ({r.ratio_lo:.2f}-{r.ratio_hi:.2f})" if _finite(r.ratio_lo) else f"{r.time_ratio:.2f}x")
    return [r.method, format_length(r.T), f"{r.status_base} -> {r.status_cand}",
            f"{format_ms(r.time_ms_base)} -> {format_ms(r.time_ms_cand)}", ratio,
            f"{r.mem_ratio:.2f}x" if _finite(r.mem_ratio) else "-", r.verdict]


COLUMNS = ["method", "T", "status", "time (median)", "time ratio (95% bounds)", "memory ratio", "verdict"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def to_table(comparison, title: str) -> Table:
    table = Table(title=title, title_justify="left", caption=verdict(comparison), caption_justify="left")
    for col in COLUMNS:
        table.add_column(col)
    styles = {"regression": "red", "improvement": "green", "changed": "yellow"}
    for r in _rows(comparison).itertuples():
        cells = _cells(r)
        if r.kind in styles:
            cells[-1] = f"[{styles[r.kind]}]{cells[-1]}[/]"
        table.add_row(*cells)
    return table


def _md_table(rows) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows.itertuples()]
    return lines


def to_markdown(comparison, baseline: str, candidate: str) -> str:
    c = comparison
    lines = [f"### racebench compare: {'regression' if c.regressions else 'no regression'}", "", verdict(c), "",
             f"Baseline `{baseline}`, candidate `{candidate}`."]
    if c.mismatches:
        lines += ["", "**The runs differ** (compared with --allow-mismatch): " + "; ".join(c.mismatches) + "."]
    rows = _rows(c)
    for title, kind in (("Regressions", "regression"), ("Improvements", "improvement")):
        part = rows[rows.kind == kind]
        notes = [*c.methods[c.methods.kind == kind].note, *part.note]
        if notes:
            lines += ["", f"#### {title}", "", *[f"- {n}" for n in notes]]
            if len(part):
                lines += ["", *_md_table(part)]
    rest = rows[~rows.kind.isin(["regression", "improvement"])]
    if len(rest):
        lines += ["", f"<details><summary>The other {len(rest)} points</summary>", "", *_md_table(rest), "",
                  "</details>"]
    return "\n".join(lines) + "\n"


def to_json(comparison, baseline: str, candidate: str) -> str:
    c = comparison
    keep = ["method", "T", "status_base", "status_cand", "impl_base", "impl_cand", "time_ms_base", "time_ms_cand",
            "time_ratio", "ratio_lo", "ratio_hi", "samples", "mem_ratio", "verdict", "kind", "note"]
    points = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
              for row in c.points[keep].to_dict("records")]
    doc = dict(verdict="regression" if c.regressions else "pass", summary=verdict(c), baseline=baseline,
               candidate=candidate, limits=vars(c.limits), mismatches=c.mismatches, regressions=c.regressions,
               improvements=c.improvements, points=points, methods=c.methods.to_dict("records"))
    return json.dumps(doc, indent=2, default=str) + "\n"
