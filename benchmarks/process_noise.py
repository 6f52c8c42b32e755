"""How much processes of the same code differ, against how much one process's passes do (docs/regression-gate.md).

Measures each point in N processes, one after another, each as a sweep measures a point (warm-up, timed passes),
and prints per point the processes' medians, their coefficient of variation and max / min, and the median over
processes of each one's interquartile range over median.

    python benchmarks/process_noise.py --methods flash,linear,race --lengths 2^11,2^12 --processes 8
"""

from __future__ import annotations

import argparse
import statistics

from racebench.bench.runner import run_child
from racebench.bench.spec import build_spec
from racebench.methods.registry import get_method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="flash,linear,race")
    p.add_argument("--lengths", default="2^11,2^12")
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    spec = build_spec(methods=args.methods, lengths=args.lengths, warmup=args.warmup, repeats=args.repeats,
                      time_budget="60s", device="cpu")
    for m in spec.methods:
        get_method(m).prepare(spec.device)
    rows: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.processes):  # round after round, so that each point's processes are minutes apart
        for m in spec.methods:
            for T in spec.lengths:
                rows.setdefault((m, T), []).append(run_child(spec, m, T))
    print("point: each process's median (ms) | CV of the medians, max / min, median IQR / median of the passes")
    for (m, T), got in rows.items():
        ok = [r for r in got if r["status"] == "ok"]
        if len(ok) < 2:
            print(f"{m} T={T}: {len(ok)} process(es) completed")
            continue
        medians = [r["time_ms"] for r in ok]
        cv = statistics.stdev(medians) / statistics.mean(medians)
        iqr = statistics.median(r["time_ms_iqr"] / r["time_ms"] for r in ok)
        print(f"{m} T={T}: {' '.join(f'{x:.1f}' for x in medians)} | CV {cv:.3f}, max/min "
              f"{max(medians) / min(medians):.2f}, IQR/median {iqr:.3f}")


if __name__ == "__main__":
    main()
