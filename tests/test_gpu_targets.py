"""benchmarks/gpu_targets.py: the issue's three GPU targets computed from a run's rows and the device's ceilings,
on the second H200 check's committed runs (their figures recomputed from the rows, not copied), and a run that a
cut-off check never wrote left out with a line saying so instead of a traceback."""

import json
import subprocess
import sys

from conftest import BENCHMARKS, load_benchmark

from racebench.results.store import load_run

RUN = BENCHMARKS.parent / "results" / "h200-gpu-check-2"
SCRIPT = BENCHMARKS / "gpu_targets.py"


def median_ms(run: str, method: str, T: int) -> float:
    _, df = load_run(RUN / run)
    return float(df[(df.method == method) & (df["T"] == T) & (df.status == "ok")].time_ms.iloc[0])


def test_targets_from_the_h200_runs():
    ceilings = json.loads((RUN / "ceilings.json").read_text())
    runs = [str(RUN / "paper-gpu-race"), str(RUN / "paper-gpu-others")]
    race, paper = median_ms("paper-gpu-race", "race", 2**22), median_ms("paper-gpu-others", "race-paper", 2**22)
    table = load_benchmark("gpu_targets").targets(runs, ceilings, 2**22)
    # Device memory / 7 H D 2 bytes; the longest completed length and the first failure of the refined sweep, all
    # read from the run itself.
    meta, df = load_run(RUN / "paper-gpu-race")
    limit = meta["environment"]["gpu_memory_bytes"] / (7 * 4 * 128 * 2)
    rows = df[df.method == "race"]
    ok = int(rows[rows.status == "ok"]["T"].max())
    fail = int(rows[rows.status == "oom"]["T"].min())
    assert fail > ok and ok / limit > 0.9
    assert f"{ok:,} / {limit:,.0f} = {ok / limit:.3f} (first failure {fail:,}: OOM)" in table
    assert table.count("floor-limited length") == 1  # its budget was the device's whole memory: one row
    # 11 passes over a [1, 4, 2^22, 128] bf16 tensor at the measured copy bandwidth, against race's median.
    move_ms = 11 * 4 * 2**22 * 128 * 2 / ceilings["copy_bytes_per_s"] * 1e3
    assert f"= {move_ms:.2f} ms) | {race:.2f} ms / {move_ms:.2f} ms = {race / move_ms:.2f}x" in table
    assert f"{paper:.2f} ms / {race:.2f} ms = {paper / race:.2f}x" in table  # race-paper / race, same device


def test_a_missing_run_is_left_out_without_a_traceback(tmp_path):
    args = [sys.executable, str(SCRIPT), str(RUN / "paper-gpu-race"), str(tmp_path / "never-written"),
            "--ceilings", str(RUN / "ceilings.json")]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "left out:" in proc.stdout and "never-written" in proc.stdout
    assert "race-paper / race at T = 4,194,304 | missing (no ok point)" in proc.stdout
    proc = subprocess.run(args[:2] + [str(tmp_path / "never-written")] + args[4:], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "gpu_targets:" in proc.stderr
