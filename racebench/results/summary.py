"""Per-method summaries of a results table: the largest length completed and the threshold."""

from __future__ import annotations

import math

import pandas as pd

FAIL_CAUSES = {"oom": "OOM", "timeout": "time-out"}


def extrapolate(points: list[tuple[int, float]], T: int) -> float | None:
    """The value at length T from the growth between the two longest of (length, value) points: a power law, at
    least linear; None with fewer than two points."""
    pts = sorted(points)[-2:]
    if len(pts) < 2:
        return None
    (t1, v1), (t2, v2) = pts
    exponent = max(1.0, math.log(v2 / v1) / math.log(t2 / t1)) if v1 > 0 and v2 > 0 and t2 > t1 else 1.0
    return v2 * (T / t2) ** exponent


def thresholds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, device, dtype, causal): largest completed T with its time and peak memory,
    and the smallest T that failed with its cause (OOM, time-out, or a time-out predicted and skipped)."""
    rows = []
    keys = [k for k in ("method", "device", "dtype", "causal", "mode") if k in df]
    for key, g in df.groupby(keys, sort=False, dropna=False):
        ok = g[g.status == "ok"].sort_values("T")
        fails = g[g.status.isin(["oom", "timeout"])].sort_values("T")
        predicted = g[(g.status == "skipped") & g.error.astype(str).str.startswith("predicted")].sort_values("T")
        other = g[g.status.isin(["error", "nonfinite", "unsupported"])].sort_values("T")
        best = ok.iloc[-1] if len(ok) else None
        if len(fails):
            fail_T, cause = fails.iloc[0]["T"], FAIL_CAUSES[fails.iloc[0].status]
        elif len(predicted):
            fail_T, cause = predicted.iloc[0]["T"], "time-out (predicted)"
        elif len(other):
            fail_T, cause = other.iloc[0]["T"], other.iloc[0].status
        else:
            fail_T, cause = None, None
        rows.append(dict(zip(keys, key)) | dict(
            max_ok_T=None if best is None else int(best["T"]),
            time_ms=None if best is None else best["time_ms"],
            peak_mem_bytes=None if best is None else best["peak_mem_bytes"],
            floor_bytes=None if best is None else best["floor_bytes"],
            fail_T=None if fail_T is None else int(fail_T), cause=cause,
            error=None if fail_T is None else g[g["T"] == fail_T].iloc[0]["error"],
        ))
    return pd.DataFrame(rows)


def nothing_ran(df: pd.DataFrame) -> str | None:
    """None when some point completed; else why none did: the first point's status and reason per method."""
    if (df.status == "ok").any():
        return None
    reasons = []
    for method, g in df.sort_values("T").groupby("method", sort=False):
        first = g.iloc[0]
        error = first["error"] if isinstance(first["error"], str) else ""
        reasons.append(f"{method} {first.status}" + (f" ({error})" if error else ""))
    return "; ".join(reasons) if reasons else "it recorded no point"


def family_members(family: str) -> set[str]:
    from racebench.methods.registry import list_methods

    return {m.name for m in list_methods() if m.family == family}


def fastest(df: pd.DataFrame, methods: set[str]) -> pd.DataFrame:
    """At each length, the fastest completed point among `methods`: T, time_ms, method (one device's rows)."""
    ok = df[df.method.isin(methods) & (df.status == "ok") & df.time_ms.notna()]
    if ok.empty:
        return pd.DataFrame(columns=["T", "time_ms", "method"])
    return ok.loc[ok.groupby("T").time_ms.idxmin()].sort_values("T")[["T", "time_ms", "method"]]


def crossover(subject: pd.DataFrame, other: pd.DataFrame) -> float | None:
    """The length where the subject becomes faster than the other and stays so over the lengths both completed,
    interpolated in log-log between the two lengths around it; None where no such change is measured."""
    both = subject.set_index("T").time_ms.to_frame("a").join(other.set_index("T").time_ms.rename("b"), how="inner")
    both = both.sort_index()
    if len(both) < 2:
        return None
    ratio = (both.b / both.a).map(math.log)  # > 0: the subject is faster
    for i in range(len(both) - 1, 0, -1):
        if ratio.iloc[i] > 0 >= ratio.iloc[i - 1]:
            t0, t1 = math.log(both.index[i - 1]), math.log(both.index[i])
            r0, r1 = ratio.iloc[i - 1], ratio.iloc[i]
            return math.exp(t0 + (t1 - t0) * (0 - r0) / (r1 - r0))
        if ratio.iloc[i] <= 0:
            return None
    return None


def versus_fastest(df: pd.DataFrame, subject: str, other: str) -> tuple[pd.DataFrame, dict[str, float | None]]:
    """The subject family's fastest method against the other family's at each length both completed, per device
    (device, T, fastest <other>, its time, fastest <subject>, its time, speedup = other's time / subject's), and the
    crossover per device (None: no change measured)."""
    mine, theirs = family_members(subject), family_members(other)
    rows, crossings = [], {}
    for device, d in df.groupby("device", sort=False):
        a, b = fastest(d, mine), fastest(d, theirs)
        if a.empty or b.empty:
            continue
        crossings[device] = crossover(a, b)
        both = a.merge(b, on="T", suffixes=("_s", "_o"))
        rows += [dict(device=device, T=int(r.T), other_method=r.method_o, other_ms=r.time_ms_o,
                      subject_method=r.method_s, subject_ms=r.time_ms_s, speedup=r.time_ms_o / r.time_ms_s)
                 for r in both.itertuples()]
    return pd.DataFrame(rows), crossings
