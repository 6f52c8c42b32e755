"""race against the strongest peers and its fixed cost per pass: the GPU targets of docs/gpu-results.md
("Peers and fixed cost"), from sweep runs of one device and its ceilings, as a markdown table.

    python benchmarks/peer_targets.py RUN [RUN ...] --ceilings ceilings.json

The runs hold (scripts/gpu-check.sh's peers stages write them; any sweeps with these points do):
- non-causal race at 2^12, 2^20 and 2^22 (B=1, H=4, D=128, bf16, fwd+bwd, eager);
- causal race and softmax kernels over a range of lengths (the crossover is taken against the fastest softmax at
  each length, whichever kernel it is) and causal race at 2^20;
- causal race run to its OOM threshold under the device's whole memory (--memory-budget 100%).
Nothing is estimated: a figure whose points are missing is printed as missing.
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from racebench.bench.units import format_length
from racebench.errors import UsageError
from racebench.results.store import load_meta, load_run
from racebench.results.summary import thresholds, versus_fastest

BYTE_PASSES = 11  # reads and writes of one fwd+bwd pass over [B, H, T, D] tensors (benchmarks/gpu_targets.py)
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def _time(df, method, T, causal):
    rows = df[(df.method == method) & (df["T"] == T) & (df.causal == causal) & (df.status == "ok")
              & ~df.cuda_graphs]
    return None if rows.empty else float(rows.time_ms.min())


def _row(target, measured, goal, met):
    verdict = "missing" if met is None else ("met" if met else "not met")
    return f"| {target} | {measured} | {goal} | {verdict} |"


def targets(frames: list[tuple[dict, pd.DataFrame]], ceilings: dict) -> str:
    df = pd.concat([f for _, f in frames], ignore_index=True)
    df = df[df["mode"] == "fwd+bwd"]
    df["causal"] = df.causal.astype(bool)
    meta = frames[0][0]
    env = meta.get("environment", {})
    shapes = df[["B", "H", "D", "dtype"]].drop_duplicates()
    if len(shapes) != 1:
        raise UsageError(f"the runs hold several shapes ({len(shapes)}); give runs of one shape")
    B, H, D, dtype = shapes.iloc[0]
    per_token = int(B * H * D * ELEMENT_BYTES[dtype])
    lines = [f"Device: {env.get('gpu') or ceilings.get('device')}; B={B}, H={H}, D={D}, {dtype}, fwd+bwd, eager.",
             "", "| target | measured | goal | verdict |", "|---|---|---|---|"]

    t = _time(df, "race", 2**12, False)
    lines.append(_row("race at 2^12, non-causal", "missing" if t is None else f"{t:.3f} ms", "<= 0.5 ms",
                      None if t is None else t <= 0.5))

    causal = df[df.causal]
    table, crossings = versus_fastest(causal[~causal.cuda_graphs], "race", "softmax")
    cross = next(iter(crossings.values()), None) if crossings else None
    if not crossings:
        lines.append(_row("causal crossover against the fastest softmax", "missing: no causal race and softmax "
                          "points", "<= 4,096 tokens", None))
    elif cross is None:
        faster = len(table) and (table.speedup > 1).all()
        text = ("race faster at every length both ran" if faster else
                f"none up to {format_length(int(table['T'].max()))}" if len(table) else "no common length")
        lines.append(_row("causal crossover against the fastest softmax", text, "<= 4,096 tokens",
                          bool(faster) and table["T"].min() <= 4096 if len(table) else None))
    else:
        lines.append(_row("causal crossover against the fastest softmax", f"about {round(cross):,} tokens",
                          "<= 4,096 tokens", cross <= 4096))
    for r in table.itertuples():
        if r.T in (2**12, 2**16, 2**20):
            lines.append(f"| causal at {format_length(r.T)}: fastest softmax / race | {r.other_method} "
                         f"{r.other_ms:.3f} ms / race {r.subject_ms:.3f} ms = {r.speedup:.2f}x | - | - |")

    for T in (2**16, 2**20):  # the linear-attention peer, causal (no goal: the figure users will ask for)
        fla, race = _time(df, "linear-fla", T, True), _time(df, "race", T, True)
        if fla is not None and race is not None:
            lines.append(f"| causal at {format_length(T)}: linear-fla / race | {fla:.3f} ms / {race:.3f} ms = "
                         f"{fla / race:.2f}x | - | - |")

    t = _time(df, "race", 2**22, False)
    move = BYTE_PASSES * per_token * 2**22 / ceilings["copy_bytes_per_s"] * 1e3
    lines.append(_row(f"race at 2^22, non-causal / {BYTE_PASSES} tensor passes at the copy bandwidth ({move:.2f} ms)",
                      "missing" if t is None else f"{t:.2f} / {move:.2f} = {t / move:.2f}x", "<= 1.5x",
                      None if t is None else t / move <= 1.5))

    tc, tn = _time(df, "race", 2**20, True), _time(df, "race", 2**20, False)
    lines.append(_row("race at 2^20: causal / non-causal",
                      "missing" if None in (tc, tn) else f"{tc:.2f} / {tn:.2f} ms = {tc / tn:.2f}x", "<= 1.5x",
                      None if None in (tc, tn) else tc / tn <= 1.5))

    memory = env.get("gpu_memory_bytes")
    th = thresholds(causal[(causal.method == "race") & ~causal.cuda_graphs])
    fails = th.dropna(subset=["fail_T"]) if len(th) else th
    if memory and len(fails) and fails.iloc[0].cause == "OOM":
        limit = memory / (7 * per_token)
        ok = int(fails.iloc[0].max_ok_T)
        lines.append(_row(f"causal race's largest context / floor-limited length ({memory / 2**30:.1f} GiB / "
                          f"{7 * per_token} B per token = {limit:,.0f})", f"{ok:,} / {limit:,.0f} = {ok / limit:.3f}",
                          ">= 0.95", ok / limit >= 0.95))
    else:
        lines.append(_row("causal race's largest context / floor-limited length",
                          "missing: no causal race run to its OOM threshold", ">= 0.95", None))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--ceilings", required=True, help="JSON written by benchmarks/ceilings.py --json")
    a = parser.parse_args(argv)
    try:
        with open(a.ceilings) as f:
            ceilings = json.load(f)
        frames = []
        for run in a.runs:  # a run a cut-off check never wrote is left out, and said so
            try:
                load_meta(run)
                frames.append(load_run(run))
            except UsageError as exc:
                print(f"left out: {exc}")
        if not frames:
            raise UsageError("none of the runs given is a racebench run")
        print(targets(frames, ceilings))
    except (OSError, ValueError, UsageError) as exc:
        sys.exit(f"peer_targets: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
