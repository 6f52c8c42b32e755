"""compare as a regression gate: decided with the repeats' noise, every status change named, strict matching, and
output for a terminal, a pull request and a bot."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from racebench.bench.runner import run_sweep
from racebench.bench.spec import build_spec
from racebench.cli import app
from racebench.results.compare import ratio_interval

runner = CliRunner()
ENV = {"COLUMNS": "200"}
RESULTS = Path(__file__).resolve().parents[1] / "results"


def noisy_run(path, *, seed, slow=None, factor=1.0, spread=0.03, status=None, impl=None, repeats=10, rounds=1,
              process_spread=0.0, calls=None):
    """A run of race, flash and linear whose timed passes are drawn around a fixed model: `slow` (a method) takes
    `factor` times as long; `status` maps (method, T) to a failure; `impl` renames race's implementation. Each
    point's process draws a factor of its own (`process_spread`: processes of the same code differ more than one
    process's passes do, as on a shared CPU); `calls` collects the points measured, in order."""
    rng = np.random.default_rng(seed)

    def model(spec, method, T):
        if calls is not None:
            calls.append((method, T))
        base = {"race": T / 100, "flash": T * T / 1e5, "linear": T / 50}[method] * (factor if method == slow else 1)
        base *= np.exp(process_spread * rng.standard_normal())
        times = list(base * (1 + spread * rng.standard_normal(repeats)))
        st = (status or {}).get((method, T), "ok")
        return {"method": method, "T": T, "status": st, "device": "cpu", "dtype": "fp32", "B": 1, "H": 4, "D": 16,
                "causal": False, "mode": "fwd+bwd", "floor_bytes": 1000, "time_ms": float(np.median(times)),
                "times_ms": times, "repeats": repeats, "peak_mem_bytes": 2000,
                "impl": (impl or {}).get(method, "torch"), "error": None if st == "ok" else f"{st} here"}

    spec = build_spec(methods="race,flash,linear", lengths="1K,2K,4K", heads="4", head_dim="16", time_budget="1h",
                      memory_budget="1GiB", rounds=rounds)
    run_sweep(spec, path, measure=model)
    return path


def test_the_interval_covers_noise_and_excludes_a_real_slowdown():
    rng = np.random.default_rng(0)
    base = 10 * (1 + 0.05 * rng.standard_normal(10))
    lo, hi = ratio_interval(base, 10 * (1 + 0.05 * rng.standard_normal(10)))
    assert lo < 1 < hi
    lo, hi = ratio_interval(base, 15 * (1 + 0.05 * rng.standard_normal(10)))
    assert 1.35 < lo < 1.5 < hi < 1.65
    assert ratio_interval([10.0], [12.0]) == (1.2, 1.2)  # no repeats kept: the ratio itself


def test_same_code_passes_and_a_slowed_method_alone_is_flagged(tmp_path):
    base = noisy_run(tmp_path / "base", seed=1)
    same = noisy_run(tmp_path / "same", seed=2)
    slow = noisy_run(tmp_path / "slow", seed=3, slow="linear", factor=1.25)
    result = runner.invoke(app, ["compare", str(base), str(same)], env=ENV)
    assert result.exit_code == 0 and "No regression in 9 points" in result.output, result.output
    result = runner.invoke(app, ["compare", str(base), str(slow), "--format", "json"], env=ENV)
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["verdict"] == "regression"
    flagged = {p["method"] for p in doc["points"] if p["kind"] == "regression"}
    assert flagged == {"linear"} and len(doc["regressions"]) == 3
    assert all(p["ratio_lo"] > 1.1 for p in doc["points"] if p["kind"] == "regression")


def test_noise_wider_than_the_slowdown_is_not_a_regression(tmp_path):
    base = noisy_run(tmp_path / "base", seed=1, spread=0.3, repeats=3)
    slow = noisy_run(tmp_path / "slow", seed=2, spread=0.3, repeats=3, slow="race", factor=1.15)
    result = runner.invoke(app, ["compare", str(base), str(slow), "--format", "json"], env=ENV)
    doc = json.loads(result.stdout)
    race = [p for p in doc["points"] if p["method"] == "race"]
    assert all(p["kind"] == "same" and p["ratio_lo"] < 1.1 for p in race), race


def test_rounds_spread_each_point_over_the_run_and_fold_into_one_row(tmp_path):
    from racebench.results.store import load_run

    calls = []
    run = noisy_run(tmp_path / "run", seed=1, rounds=3, repeats=4, calls=calls)
    first = [(m, T) for m in ("race", "flash", "linear") for T in (1024, 2048, 4096)]
    assert calls == first * 3  # the whole sweep, then each later round in the same order
    rows = [json.loads(line) for line in (run / "points.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] * 9 + [2] * 9 + [3] * 9
    _, table = load_run(run)
    assert len(table) == 9 and (table.rounds == 3).all() and (table.repeats == 12).all()
    _, full = load_run(run, samples=True)
    for r in full.itertuples():
        mine = [x for x in rows if (x["method"], x["T"]) == (r.method, r.T)]
        assert r.round_ms == [x["time_ms"] for x in mine] and r.time_ms == float(np.median(r.round_ms))
        assert sorted(r.times_ms) == sorted(t for x in mine for t in x["times_ms"])
        assert r.time_ms_min == min(r.times_ms) and r.time_ms_max == max(r.times_ms)


def test_a_point_that_fails_in_a_later_round_is_not_ok(tmp_path):
    from racebench.results.timing import merge_rounds

    ok = {"method": "race", "T": 1024, "status": "ok", "time_ms": 2.0, "times_ms": [2.0], "tokens_per_s": 5e5,
          "peak_mem_bytes": 10, "error": None}
    rows = merge_rounds([ok | {"round": 1}, ok | {"round": 2, "peak_mem_bytes": 30},
                         {"method": "race", "T": 1024, "status": "timeout", "error": "slow", "round": 3}])
    assert len(rows) == 1 and rows[0]["status"] == "timeout" and rows[0]["rounds"] == 3
    merged = merge_rounds([ok | {"round": 2, "time_ms": 4.0, "times_ms": [4.0]}, ok | {"round": 1}])[0]
    assert merged["round_ms"] == [2.0, 4.0] and merged["peak_mem_bytes"] == 10 and merged["time_ms"] == 3.0
    assert merged["tokens_per_s"] == pytest.approx(1000 / 3.0 * 1e3)  # tokens from the first round: 1000


def test_a_resumed_run_finishes_its_rounds_without_repeating_any(tmp_path):
    calls, interrupt = [], [True]
    spec = build_spec(methods="race,linear", lengths="1K,2K", time_budget="1h", memory_budget="1GiB", rounds=3)

    def measure(spec, method, T):
        calls.append((method, T))
        if interrupt[0] and len(calls) == 6:
            raise KeyboardInterrupt
        return {"method": method, "T": T, "status": "ok", "time_ms": 1.0, "times_ms": [1.0], "device": "cpu"}

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, tmp_path / "run", measure=measure)
    calls.clear()
    interrupt[0] = False
    run_sweep(spec, tmp_path / "run", resume=True, measure=measure)
    assert calls == [("race", 2048), ("linear", 1024), ("linear", 2048)] + [("race", 1024), ("race", 2048),
                                                                             ("linear", 1024), ("linear", 2048)]
    rounds = [json.loads(line)["round"] for line in (tmp_path / "run" / "points.jsonl").read_text().splitlines()]
    assert sorted(rounds) == [1] * 4 + [2] * 4 + [3] * 4


def test_the_gate_judges_processes_not_passes(tmp_path):
    """Processes of the same code that differ by 15% while each one's passes agree to 1%: judged on passes, two
    runs of one code differ "beyond the noise"; judged on rounds (a process each) they do not, and a 1.5x
    slowdown still shows."""
    def flagged(base, cand):
        result = runner.invoke(app, ["compare", str(base), str(cand), "--format", "json"], env=ENV)
        doc = json.loads(result.stdout)
        return {(p["method"], p["T"]) for p in doc["points"] if p["kind"] == "regression"}, doc

    noise = dict(spread=0.01, repeats=5, process_spread=0.15)
    one = [noisy_run(tmp_path / f"one-{i}", seed=i, **noise) for i in range(4)]
    assert sum(bool(flagged(a, b)[0]) for a, b in [(one[0], one[1]), (one[2], one[3]), (one[1], one[2])]) >= 2
    base = noisy_run(tmp_path / "base", seed=10, rounds=8, **noise)
    same = noisy_run(tmp_path / "same", seed=11, rounds=8, **noise)
    slow = noisy_run(tmp_path / "slow", seed=12, rounds=8, slow="flash", factor=1.5, **noise)
    assert "record both runs with --rounds" in flagged(one[0], one[1])[1]["summary"]
    hits, doc = flagged(base, same)
    assert not hits and {p["samples"] for p in doc["points"]} == {"rounds"} and "--rounds" not in doc["summary"]
    hits, doc = flagged(base, slow)
    assert {m for m, _ in hits} == {"flash"}
    assert all("from the rounds" in n for n in doc["regressions"])


def test_the_rates_benchmark_counts_false_alarms_and_detections(tmp_path):
    import subprocess
    import sys

    runs = [str(noisy_run(tmp_path / f"run-{i}", seed=i, rounds=4, repeats=3, spread=0.01, process_spread=0.02))
            for i in range(3)]
    for extra in ([], ["--one-round"]):
        out = subprocess.run([sys.executable, "benchmarks/gate_rates.py", *runs, "--method", "linear", "--factor",
                              "1.5", *extra], capture_output=True, text=True, cwd=RESULTS.parent, check=True).stdout
        assert "false alarms (same code flagged): 0 of 3" in out, out
        assert "detected (linear slowed 1.5x): 3 of 3" in out and "another method too: 0 of 3" in out, out


def test_every_status_change_is_named(tmp_path):
    base = noisy_run(tmp_path / "base", seed=1, status={("flash", 4096): "error"})
    cand = noisy_run(tmp_path / "cand", seed=2, status={("race", 4096): "oom", ("flash", 4096): "ok",
                                                         ("linear", 2048): "error"},
                     impl={"race": "cpp"})
    (cand / "results.csv").unlink()
    rows = (cand / "points.jsonl").read_text().splitlines()
    (cand / "points.jsonl").write_text("\n".join(r for r in rows if '"linear"' not in r or '"T": 1024' not in r) + "\n")
    result = runner.invoke(app, ["compare", str(base), str(cand), "--format", "markdown"], env=ENV)
    assert result.exit_code == 1
    out = result.stdout
    assert "race T=2^12" not in out  # lengths in notes are plain numbers
    for note in ("race T=4096: completed in the baseline, now runs out of memory",
                 "linear T=2048: completed in the baseline, now fails with an error",
                 "linear T=1024: in the baseline (ok), missing from the candidate",
                 "flash T=4096: now completes (in the baseline it fails with an error)",
                 "race T=1024: ran cpp where the baseline ran torch; times not compared"):
        assert note in out, note
    assert "#### Regressions" in out and "#### Improvements" in out and "racebench compare: regression" in out


def test_runs_of_different_gpus_are_refused_unless_allowed():
    h100, h200 = RESULTS / "h100-gpu-check-1" / "paper-gpu-race", RESULTS / "h200-gpu-check-2" / "paper-gpu-race"
    result = runner.invoke(app, ["compare", str(h100), str(h200)], env=ENV)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "gpu: NVIDIA H100 80GB HBM3 against NVIDIA H200" in result.output and "--allow-mismatch" in result.output
    result = runner.invoke(app, ["compare", str(h100), str(h200), "--allow-mismatch", "--format", "markdown"], env=ENV)
    assert result.exit_code in (0, 1) and "**The runs differ**" in result.stdout and "H100" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--max-slowdown", "fast"], "--max-slowdown takes a percentage or a factor"),
    (["--format", "html"], "--format must be one of table, markdown, json"),
    (["--output", "/proc/nope/out.md", "--format", "markdown"], "cannot write /proc/nope/out.md"),
])
def test_bad_compare_input_is_one_line_exit_2(tmp_path, args, message):
    base = noisy_run(tmp_path / "base", seed=1)
    result = runner.invoke(app, ["compare", str(base), str(base), *args], env=ENV)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_output_to_a_file_and_to_stdout(tmp_path):
    base = noisy_run(tmp_path / "base", seed=1)
    out = tmp_path / "compare.md"
    assert runner.invoke(app, ["compare", str(base), str(base), "--format", "markdown", "--output", str(out)],
                         env=ENV).exit_code == 0
    assert out.read_text().startswith("### racebench compare: no regression")
    result = runner.invoke(app, ["compare", str(base), str(base), "--format", "json", "--output", "-"], env=ENV)
    assert json.loads(result.stdout)["verdict"] == "pass"


def test_every_timed_pass_is_kept_and_results_csv_has_the_spread(tmp_path):
    from racebench.results.store import load_run
    from racebench.results.timing import timing_fields

    fields = timing_fields([4.0, 1.0, 3.0, 2.0, 100.0], tokens=1000)
    assert (fields["time_ms"], fields["time_ms_min"], fields["time_ms_max"]) == (3.0, 1.0, 100.0)
    assert fields["time_ms_iqr"] == 2.0 and fields["times_ms"] == [4.0, 1.0, 3.0, 2.0, 100.0]
    run = noisy_run(tmp_path / "run", seed=1)
    _, table = load_run(run)
    _, samples = load_run(run, samples=True)
    assert "times_ms" not in table and "time_ms_iqr" in table
    assert all(len(t) == 10 for t in samples.times_ms)


def test_presets_for_ci_and_the_baseline_folder():
    from racebench import api
    from racebench.bench.spec import PRESETS, build_spec

    assert set(api.PRESET_NAMES) == set(PRESETS)
    spec = build_spec(preset="ci-cpu")
    assert spec.methods == ("race", "race-paper", "flash", "linear") and (spec.repeats, spec.rounds) == (3, 8)
    assert spec.lengths == (1024, 2048, 4096) and spec.device == "cpu"
    result = runner.invoke(app, ["baseline", "--device", "cpu", "--where"], env=ENV)
    assert result.exit_code == 0 and result.output.strip().startswith("results/baselines/cpu-")
