"""Regression gate: match the points of two runs and flag slowdowns, memory growth and thresholds that moved down."""

from __future__ import annotations

import pandas as pd

KEYS = ["method", "race_P", "race_L", "race_beta", "race_M", "race_normalize", "device", "dtype", "B", "H", "D",
        "causal", "mode", "nproc", "T"]


def compare_runs(base: pd.DataFrame, cand: pd.DataFrame, *, max_slowdown: float, max_memory_growth: float):
    """Returns (table of matched points with ratios and verdicts, list of failure sentences)."""
    def prep(df):
        df = df.copy()
        for k in KEYS:
            df[k] = df[k].astype(str)  # NaN knobs of non-RACE methods match each other as "nan"
        return df.drop_duplicates(KEYS, keep="last")

    m = prep(base).merge(prep(cand), on=KEYS, suffixes=("_base", "_cand"))
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
