"""The GPU targets (issue 6) from a paper-protocol run and the device's ceilings, as a markdown table.

    python benchmarks/gpu_targets.py RUN [RUN ...] --ceilings ceilings.json [--at 2^22]

1. race's OOM threshold against the floor-limited length: device memory (and the sweep's memory budget)
   divided by the floor, 7 * H * D * element bytes per token (q, k, v, o and their three gradients).
2. race fwd+bwd at --at against the time needed just to move its bytes at the measured copy bandwidth: one
   timed step reads q, k, v and writes o (forward), the protocol's loss reads o, and the backward reads q, k, v
   and writes dq, dk, dv (the output gradient is a broadcast scalar: fused.py hands the kernels one row of it,
   read from cache): 11 passes over a [B, H, T, D] tensor.
3. race against race-paper (and race-torch) at --at, from the same run.
Nothing is estimated: a figure whose points are missing is printed as missing.
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from racebench.bench.units import parse_length
from racebench.errors import UsageError
from racebench.results.store import load_meta, load_run
from racebench.results.summary import thresholds

BYTE_PASSES = 11


def _time_at(df, method, T):
    rows = df[(df.method == method) & (df["T"] == T) & (df.status == "ok")]
    return None if rows.empty else float(rows.iloc[0].time_ms)


def _time_rows(df, T, bytes_per_token, copy_bytes_per_s) -> list[str]:
    """Race at length T against the time of its byte passes at the copy bandwidth, and against race-paper and
    race-torch."""
    t_race = _time_at(df, "race", T)
    tensor_bytes = bytes_per_token * T
    move_ms = BYTE_PASSES * tensor_bytes / copy_bytes_per_s * 1e3
    if t_race is None:
        return [f"| race at T = {T:,} | missing: no ok point | within 3x of {move_ms:.2f} ms |"]
    rows = [f"| race at T = {T:,} / time to move its bytes ({BYTE_PASSES} x {tensor_bytes / 2**30:.2f} GiB at the "
            f"copy bandwidth = {move_ms:.2f} ms) | {t_race:.2f} ms / {move_ms:.2f} ms = {t_race / move_ms:.2f}x "
            "| <= 3x |"]
    for other in ("race-paper", "race-torch"):
        t = _time_at(df, other, T)
        measured = "missing (no ok point)" if t is None else f"{t:.2f} ms / {t_race:.2f} ms = {t / t_race:.2f}x"
        rows.append(f"| {other} / race at T = {T:,} | {measured} | {'>= 3x' if other == 'race-paper' else '-'} |")
    return rows


def targets(runs: list[str], ceilings: dict, at: int) -> str:
    metas, frames = zip(*(load_run(r) for r in runs))
    df = pd.concat(frames, ignore_index=True)
    df = df[~df.causal.astype(bool)]
    env, spec = metas[0]["environment"], metas[0]["spec"]
    B, H, D = spec["B"], spec["H"], spec["D"]
    elt = {"bf16": 2, "fp16": 2, "fp32": 4}[spec["dtype"]]
    lines = [f"Device: {env.get('gpu') or ceilings['device']}; B={B}, H={H}, D={D}, {spec['dtype']}, non-causal, "
             f"fwd+bwd. Copy bandwidth {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write).", "",
             "| target | measured | goal |", "|---|---|---|"]
    th = thresholds(df[df.method == "race"])
    floor = 7 * H * D * elt * B
    if len(th) and th.iloc[0].max_ok_T:
        ok, fail = int(th.iloc[0].max_ok_T), th.iloc[0].fail_T
        device, budget = env.get("gpu_memory_bytes"), spec["memory_budget_bytes"]
        totals = ((("device memory = memory budget", device),) if device == budget else
                  (("device memory", device), ("memory budget", budget)))
        for what, total in totals:
            if total:
                limit = total / floor
                lines.append(f"| race's largest context / floor-limited length ({what} {total / 2**30:.1f} GiB / "
                             f"{floor} B per token = {limit:,.0f}) | {ok:,} / {limit:,.0f} = {ok / limit:.3f}"
                             f"{'' if pd.isna(fail) else f' (first failure {int(fail):,}: {th.iloc[0].cause})'} "
                             f"| >= 0.9 |")
    else:
        lines.append("| race's OOM threshold | missing: no race point completed | >= 0.9 of the floor-limited length |")
    lines += _time_rows(df, at, B * H * D * elt, ceilings["copy_bytes_per_s"])
    done = df[(df.method == "race") & (df.status == "ok")]
    if _time_at(df, "race", at) is None and len(done):  # the same ratios where race last completed, so labelled
        lines += _time_rows(df, int(done["T"].max()), B * H * D * elt, ceilings["copy_bytes_per_s"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--ceilings", required=True, help="JSON written by benchmarks/ceilings.py --json")
    parser.add_argument("--at", default="2^22", help="length for the time targets (default 2^22)")
    args = parser.parse_args()
    try:
        with open(args.ceilings) as f:
            ceilings = json.load(f)
        # A run a cut-off check never wrote is left out, and said so; the figures it would give print as missing.
        runs = []
        for run in args.runs:
            try:
                load_meta(run)
                runs.append(run)
            except UsageError as exc:
                print(f"left out: {exc}")
        if not runs:
            raise UsageError("none of the runs given is a racebench run")
        print(targets(runs, ceilings, parse_length(args.at)))
    except (OSError, ValueError, UsageError) as exc:
        sys.exit(f"gpu_targets: {exc}")


if __name__ == "__main__":
    main()
