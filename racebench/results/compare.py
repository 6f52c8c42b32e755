"""Regression gate: match the points of two runs and flag slowdowns, memory growth and thresholds that moved down."""

from __future__ import annotations

import pandas as pd

from racebench.results.schema import MATCH_COLUMNS


def match_keys(knob_columns) -> list[str]:
    """What two points must share to be compared: method, every knob, shape, dtype, device, mode and length."""
    return [MATCH_COLUMNS[0], *dict.fromkeys(knob_columns), *MATCH_COLUMNS[1:]]


def _key(value) -> str:
    """One spelling per value, whatever the CSV reader made of it: 3, 3.0 and '3' match; NaN and None match."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, bool):
        return str(value)
    try:
        return repr(float(value))
    except (TypeError, ValueError):
        return str(value)


def compare_runs(base: pd.DataFrame, cand: pd.DataFrame, *, max_slowdown: float, max_memory_growth: float,
                 knob_columns=()):
    """Returns (table of matched points with ratios and verdicts, list of failure sentences)."""
    keys = match_keys(knob_columns)

    def prep(df):
        df = df.copy()
        for k in keys:
            df[k] = df[k].map(_key) if k in df else "-"  # a knob of a method only the other run has
        return df.drop_duplicates(keys, keep="last")

    m = prep(base).merge(prep(cand), on=keys, suffixes=("_base", "_cand"))
    m["T"] = m["T"].astype(float).astype(int)
    m["time_ratio"] = m.time_ms_cand / m.time_ms_base
    m["mem_ratio"] = m.peak_mem_bytes_cand / m.peak_mem_bytes_base
    failures, verdicts = [], []
    for r in m.itertuples():
        what = f"{r.method} T={r.T}"
        if r.status_base == "ok" and r.status_cand != "ok":
            verdicts.append("threshold down")
            failures.append(f"{what}: completed in the baseline, now {r.status_cand}")
        elif r.status_base == "ok" and r.time_ratio > 1 + max_slowdown:
            verdicts.append("slower")
            failures.append(f"{what}: {r.time_ratio:.2f}x the baseline time (limit {1 + max_slowdown:.2f}x)")
        elif r.status_base == "ok" and r.mem_ratio > 1 + max_memory_growth:
            verdicts.append("bigger")
            failures.append(f"{what}: {r.mem_ratio:.2f}x the baseline peak memory (limit {1 + max_memory_growth:.2f}x)")
        else:
            verdicts.append("ok")
    m["verdict"] = verdicts
    return m, failures
