"""Regression gate: a candidate run's points against a baseline's, decided with the noise between processes.

A point is slower when the one-sided 95% lower bound of its time ratio (candidate median / baseline median,
bootstrapped from both runs' rounds, a process each: --rounds; from their timed passes where a run has one round)
exceeds 1 + the tolerated slowdown: the slowdown is larger than the threshold by more than the samples' spread
explains (docs/regression-gate.md has the measured false-alarm and
detection rates). Faster is the mirror image. Memory is deterministic enough to compare directly; each method's
largest completed length is compared too. Every status change is named in words."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from racebench.results.schema import MATCH_COLUMNS, ROUND_COLUMN, SAMPLE_COLUMN
from racebench.results.summary import thresholds

CONFIDENCE = 0.95
RESAMPLES = 4000
STATUS_WORDS = {"ok": "completes", "oom": "runs out of memory", "timeout": "times out", "skipped": "is skipped",
                "unsupported": "is unsupported", "error": "fails with an error", "nonfinite": "gives NaN or Inf",
                "missing": "is missing"}


@dataclass(frozen=True)
class Limits:
    """Tolerated growths, as fractions: 0.10 = 10% slower (or 1.1x)."""

    time: float = 0.10
    memory: float = 0.05
    threshold: float = 0.0  # drop of a method's largest completed length


@dataclass
class Comparison:
    points: pd.DataFrame  # one row per point of either run: statuses, ratios, interval, verdict, kind, note
    methods: pd.DataFrame  # one row per method: largest completed length in each run, verdict
    limits: Limits
    mismatches: list[str] = field(default_factory=list)  # what differs between the runs' environments

    def notes(self, kind: str) -> list[str]:
        """The sentences of every point and method of one kind (regression, improvement, changed, same)."""
        return [*self.points[self.points.kind == kind].note, *self.methods[self.methods.kind == kind].note]

    @property
    def regressions(self) -> list[str]:
        return self.notes("regression")

    @property
    def improvements(self) -> list[str]:
        return self.notes("improvement")


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


def ratio_interval(base_ms, cand_ms, *, confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """One-sided bounds (lower, upper), each at `confidence`, of median(cand) / median(base): a percentile
    bootstrap resampling both runs' timed passes. With fewer than two passes on a side, the ratio itself."""
    base, cand = np.asarray(base_ms, float), np.asarray(cand_ms, float)
    ratio = float(np.median(cand) / np.median(base))
    if len(base) < 2 or len(cand) < 2:
        return ratio, ratio
    rng = np.random.default_rng(seed)
    b = np.median(rng.choice(base, (RESAMPLES, len(base))), axis=1)
    c = np.median(rng.choice(cand, (RESAMPLES, len(cand))), axis=1)
    lo, hi = np.quantile(c / b, [1 - confidence, confidence])
    return float(lo), float(hi)


def _listed(row, column: str, side: str) -> list | None:
    value = row.get(f"{column}_{side}")
    return value if isinstance(value, list) and value else None


def samples(row) -> tuple[list, list, str]:
    """(baseline samples, candidate samples, what they are) of a matched point: each round's median where both runs
    measured it in several processes (processes of the same code differ by more than one process's passes do, so
    passes alone would call that difference a regression); else every timed pass; else the medians alone."""
    rounds = [_listed(row, ROUND_COLUMN, side) for side in ("base", "cand")]
    if all(r and len(r) > 1 for r in rounds):
        return rounds[0], rounds[1], "rounds"
    passes = [_listed(row, SAMPLE_COLUMN, side) for side in ("base", "cand")]
    if all(passes):
        return passes[0], passes[1], "passes"
    return [row["time_ms_base"]], [row["time_ms_cand"]], "medians"


def _judge(r: dict, limits: Limits) -> tuple[str, str, str]:
    """(verdict, kind, note) of one matched point; kind is regression, improvement, changed or same."""
    what = f"{r['method']} T={r['T']}"
    sb, sc = r["status_base"], r["status_cand"]
    if sc == "missing":
        return "missing", "regression", f"{what}: in the baseline ({sb}), missing from the candidate"
    if sb == "missing":
        return "new", "same", f"{what}: new in the candidate ({sc})"
    if sb == "ok" and sc != "ok":
        return f"now {sc}", "regression", f"{what}: completed in the baseline, now {STATUS_WORDS[sc]}"
    if sb != "ok" and sc == "ok":
        return "now ok", "improvement", f"{what}: now completes (in the baseline it {STATUS_WORDS[sb]})"
    if sb != "ok":
        kind = "same" if sb == sc else "changed"
        return f"{sb} -> {sc}", kind, f"{what}: in the baseline it {STATUS_WORDS[sb]}, now it {STATUS_WORDS[sc]}"
    if _key(r["impl_base"]) != _key(r["impl_cand"]):
        return "impl changed", "regression", (f"{what}: ran {r['impl_cand']} where the baseline ran "
                                              f"{r['impl_base']}; times not compared")
    ratio, lo, hi = r["time_ratio"], r["ratio_lo"], r["ratio_hi"]
    span = f"{ratio:.2f}x the baseline time (95% bounds {lo:.2f}-{hi:.2f}x from the {r['samples']})"
    if lo > 1 + limits.time:
        return "slower", "regression", f"{what}: {span}, over the {1 + limits.time:.2f}x limit"
    if r["mem_ratio"] > 1 + limits.memory:
        return "bigger", "regression", (f"{what}: {r['mem_ratio']:.2f}x the baseline peak memory, over the "
                                        f"{1 + limits.memory:.2f}x limit")
    if hi < 1 / (1 + limits.time):
        return "faster", "improvement", f"{what}: {span}"
    return "same", "same", f"{what}: {span}"


def compare_runs(base: pd.DataFrame, cand: pd.DataFrame, *, limits: Limits = Limits(), knob_columns=(),
                 mismatches=()) -> Comparison:
    """Match the points of two runs (load_run(..., samples=True) frames) on every key, and judge each."""
    keys = match_keys(knob_columns)

    def prep(df):
        df = df.copy()
        for k in keys:
            df[k] = df[k].map(_key) if k in df else "-"  # a knob of a method only the other run has
        for col in (SAMPLE_COLUMN, ROUND_COLUMN):
            if col not in df:
                df[col] = None
        return df.drop_duplicates(keys, keep="last")

    m = prep(base).merge(prep(cand), on=keys, how="outer", suffixes=("_base", "_cand"), sort=False)
    m["T"] = m["T"].astype(float).astype(int)
    for side in ("base", "cand"):
        m[f"status_{side}"] = m[f"status_{side}"].fillna("missing")
    m["time_ratio"] = m.time_ms_cand / m.time_ms_base
    m["mem_ratio"] = m.peak_mem_bytes_cand / m.peak_mem_bytes_base
    bounds, kinds = [], []
    for r in m.to_dict("records"):
        if r["status_base"] == r["status_cand"] == "ok":
            b, c, kind = samples(r)
            bounds.append(ratio_interval(b, c))
            kinds.append(kind)
        else:
            bounds.append((np.nan, np.nan))
            kinds.append(None)
    m["ratio_lo"], m["ratio_hi"] = zip(*bounds) if bounds else ([], [])
    m["samples"] = kinds
    judged = [_judge(r, limits) for r in m.to_dict("records")]
    m["verdict"], m["kind"], m["note"] = zip(*judged) if judged else ([], [], [])
    return Comparison(m, _methods(base, cand, limits), limits, list(mismatches))


def _methods(base: pd.DataFrame, cand: pd.DataFrame, limits: Limits) -> pd.DataFrame:
    """Each method's largest completed length in both runs, and whether it fell by more than the limit."""
    tb, tc = (thresholds(df).set_index("method")["max_ok_T"] for df in (base, cand))
    rows = []
    for method in dict.fromkeys([*tb.index, *tc.index]):
        b, c = tb.get(method), tc.get(method)
        b, c = (None if x is None or x != x else int(x) for x in (b, c))
        kind, note = "same", f"{method}: largest completed length {b} -> {c}"
        if b is not None and (c is None or c < b * (1 - limits.threshold)):
            kind = "regression"
            note = f"{method}: largest completed length fell from {b:,} to {c:,}" if c else (
                f"{method}: completed {b:,} tokens in the baseline, no length in the candidate")
        elif c is not None and (b is None or c > b):
            kind, note = "improvement", f"{method}: largest completed length rose from {b or 0:,} to {c:,}"
        rows.append(dict(method=method, max_ok_T_base=b, max_ok_T_cand=c, kind=kind, note=note))
    return pd.DataFrame(rows, columns=["method", "max_ok_T_base", "max_ok_T_cand", "kind", "note"])


def environment_differences(base_meta: dict, cand_meta: dict) -> list[str]:
    """What makes two runs' times incomparable: the device kind and model, torch's and Triton's major.minor."""
    diffs = []
    devices = [meta.get("spec", {}).get("device") for meta in (base_meta, cand_meta)]
    if devices[0] != devices[1]:
        diffs.append(f"device: {devices[0]} against {devices[1]}")
    model_key = "gpu" if devices[1] == "cuda" else "cpu"
    for key, norm in ((model_key, str), ("torch", _major_minor), ("triton", _major_minor)):
        a, b = ((meta.get("environment") or {}).get(key) for meta in (base_meta, cand_meta))
        if norm(a) != norm(b):
            diffs.append(f"{key}: {a} against {b}")
    return diffs


def _major_minor(version) -> str:
    return ".".join(str(version).split("+")[0].split(".")[:2]) if version else "-"
