"""False-alarm and detection rates of `racebench compare` (docs/regression-gate.md).

Given N runs of the same code (e.g. `racebench sweep --preset ci-cpu` N times), compares every pair: the false
alarms are pairs that flag anything. For detection, each pair's candidate is copied with one method's timed passes
(and medians) scaled by a factor, as if that method had been slowed: a pair detects it when that method is flagged
and no other is.

    python benchmarks/gate_rates.py results/gate-cpu-1 ... results/gate-cpu-6 --method linear --factor 1.25
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
from pathlib import Path

import racebench


def slowed_copy(run: Path, method: str, factor: float, into: Path) -> Path:
    """The run with `method`'s times multiplied by `factor`, in every round (points.jsonl is the record, one row per
    point and round; results.csv is dropped)."""
    out = into / f"{run.name}-{method}-x{factor:g}"
    if out.exists():
        return out
    shutil.copytree(run, out)
    rows = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        if row["method"] == method and row.get("status") == "ok":
            row["times_ms"] = [t * factor for t in row.get("times_ms") or []]
            for key in ("time_ms", "time_ms_min", "time_ms_max", "time_ms_iqr", "pass_ms"):
                if row.get(key) is not None:
                    row[key] *= factor
    (out / "points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "results.csv").unlink(missing_ok=True)
    return out


def first_round(run: Path, into: Path) -> Path:
    """The run as if it had been measured in one round: its first round's rows alone (compare then judges each
    point on that one process's timed passes)."""
    out = into / f"{run.name}-round-1"
    shutil.copytree(run, out)
    rows = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines() if line.strip()]
    (out / "points.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if (r.get("round") or 1) == 1))
    (out / "results.csv").unlink(missing_ok=True)
    return out


def flagged_methods(base: Path, cand: Path, limit: str) -> set[str]:
    result = racebench.compare(base, cand, max_slowdown=limit)
    return {m for frame in (result.points, result.methods) for m in frame[frame.kind == "regression"].method}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--method", default="linear", help="the method to slow down for the detection rate")
    p.add_argument("--factor", type=float, default=1.25)
    p.add_argument("--limit", default="10%", help="compare's --max-slowdown")
    p.add_argument("--one-round", action="store_true", help="judge each run's first round alone (one process "
                   "per point: its timed passes are the samples)")
    args = p.parse_args()
    alarms, detected, wrong = [], 0, []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [first_round(run, Path(tmp)) for run in args.runs] if args.one_round else args.runs
        pairs = list(itertools.combinations(runs, 2))
        for base, cand in pairs:
            if flagged := flagged_methods(base, cand, args.limit):
                alarms.append(f"{base.name} vs {cand.name}: {', '.join(sorted(flagged))}")
            slow = flagged_methods(base, slowed_copy(cand, args.method, args.factor, Path(tmp)), args.limit)
            detected += args.method in slow
            if slow - {args.method}:
                wrong.append(f"{base.name} vs {cand.name}: also {', '.join(sorted(slow - {args.method}))}")
    print(f"pairs: {len(pairs)}; limit {args.limit}{'; first rounds only' if args.one_round else ''}")
    print(f"false alarms (same code flagged): {len(alarms)} of {len(pairs)}")
    for line in alarms:
        print(f"  {line}")
    print(f"detected ({args.method} slowed {args.factor:g}x): {detected} of {len(pairs)}")
    print(f"pairs flagging another method too: {len(wrong)} of {len(pairs)}")
    for line in wrong:
        print(f"  {line}")


if __name__ == "__main__":
    main()
