"""What a point records of its timed passes, and one point measured in several rounds (--rounds: a process per
round) folded into one row."""

from __future__ import annotations

import statistics

from racebench.results.schema import ROUND_COLUMN


def timing_fields(times_ms: list[float], tokens: int) -> dict:
    """What a row records of its timed passes: every one (times_ms, kept in points.jsonl for compare's statistics),
    their median, min, max and interquartile range, and tokens per second at the median."""
    median = statistics.median(times_ms)
    quartiles = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else [median] * 3
    return dict(time_ms=median, time_ms_min=min(times_ms), time_ms_max=max(times_ms),
                time_ms_iqr=quartiles[2] - quartiles[0], repeats=len(times_ms), tokens_per_s=tokens / median * 1e3,
                times_ms=list(times_ms))


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per point (method, T), in the order points first appear. A point measured in several rounds becomes
    one row: where every round completed, the first round's row with the median over rounds of each round's median
    time (a figure one slow process cannot move), every timed pass, each round's median (round_ms) and the largest
    peak memory; else the first round that did not complete (a point that failed once is not reliably ok).
    `rounds` says how many rounds made the row."""
    groups: dict[tuple, list[dict]] = {}
    for n, row in enumerate(rows):  # rows without a round (fidelity, quality, older sweeps) stand alone
        groups.setdefault((row["method"], row["T"]) if "round" in row else (n,), []).append(row)
    return [_merge(g) if len(g) > 1 else _single(g[0]) for g in groups.values()]


def _single(row: dict, rounds: int = 1) -> dict:
    return {k: v for k, v in row.items() if k != "round"} | {"rounds": rounds}


def _merge(group: list[dict]) -> dict:
    group = sorted(group, key=lambda r: r.get("round") or 1)
    first = _single(group[0], len(group))
    failed = next((r for r in group if r.get("status") != "ok"), None)
    if failed is not None:
        return _single(failed, len(group))
    medians = [r["time_ms"] for r in group]
    passes = [t for r in group for t in r.get("times_ms") or [r["time_ms"]]]
    tokens = first["tokens_per_s"] * first["time_ms"] / 1e3 if first.get("tokens_per_s") else first["T"]
    time_ms = statistics.median(medians)
    peaks = [r["peak_mem_bytes"] for r in group if r.get("peak_mem_bytes") is not None]
    return first | timing_fields(passes, tokens) | {
        "time_ms": time_ms, "tokens_per_s": tokens / time_ms * 1e3, ROUND_COLUMN: medians,
        "peak_mem_bytes": max(peaks) if peaks else None,
        "point_wall_s": sum(r.get("point_wall_s") or 0 for r in group)}
