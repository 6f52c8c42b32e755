"""race against its strongest peers: the fastest softmax at each length in reports, the --cuda-graphs protocol's
checks that run without a GPU, the profiler of a pass, and the peer targets read off runs."""

from pathlib import Path

import pandas as pd
import pytest
from conftest import load_benchmark
from typer.testing import CliRunner

from racebench.bench.runner import run_sweep
from racebench.bench.spec import SweepSpec, build_spec, graphs_refusal
from racebench.cli import app
from racebench.results.compare import compare_runs
from racebench.results.store import load_run
from racebench.results.summary import versus_fastest
from racebench.views.report import to_markdown, versus_frame

runner = CliRunner()
H200 = Path(__file__).parents[1] / "results" / "h200-gpu-check-2"


def two_softmax_run(path):
    """flash is the faster softmax up to 2K, sdpa-math from 4K on; race is linear (modelled points, not measured)."""
    def model(spec, method, T):
        time = {"race": T / 100, "flash": T * T / 1e5, "sdpa-math": T * T / (2e5 if T >= 4096 else 5e4)}[method]
        return {"method": method, "T": T, "status": "ok", "device": "cpu", "dtype": "fp32", "B": 1, "H": 4, "D": 16,
                "causal": True, "mode": "fwd+bwd", "time_ms": time, "repeats": 3, "error": None}

    run_sweep(build_spec(methods="race,flash,sdpa-math", lengths="512,1K,2K,4K,8K", heads="4", head_dim="16",
                         causal=True, time_budget="1h"), path, measure=model)
    return path


def test_the_fastest_softmax_at_each_length(tmp_path):
    meta, df = load_run(two_softmax_run(tmp_path / "run"))
    table, crossings = versus_fastest(df, "race", "softmax")
    assert list(table.other_method) == ["flash", "flash", "flash", "sdpa-math", "sdpa-math"]
    row = table[table["T"] == 8192].iloc[0]
    assert row.other_ms == pytest.approx(8192**2 / 2e5) and row.speedup == pytest.approx(8192**2 / 2e5 / 81.92)
    # race = flash at T = 1000; sdpa-math is 4x slower than flash below 4K, so the crossover is flash's.
    assert crossings["cpu"] == pytest.approx(1000, rel=1e-6)
    shown, lines = versus_frame(df)
    assert list(shown.columns) == ["T", "fastest softmax", "fastest race", "race speedup"]
    assert lines == ["race is faster than the fastest softmax from about 1,000 tokens."]
    text = to_markdown(meta, df, [4096])
    assert "## race against the fastest softmax at each length" in text and "sdpa-math" in text


def test_report_shows_the_fastest_softmax(tmp_path):
    run = two_softmax_run(tmp_path / "run")
    result = runner.invoke(app, ["report", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "fastest softmax" in result.output and "from about 1,000 tokens" in result.output


def test_no_crossover_is_said_plainly(tmp_path):
    _, df = load_run(two_softmax_run(tmp_path / "run"))
    shown, lines = versus_frame(df[df["T"] >= 2048])  # race already faster at every common length
    assert lines == ["race is faster than the fastest softmax at every length both completed."]
    slow = df[df["T"] <= 512].assign(time_ms=lambda d: d.time_ms.where(d.method != "race", 1e9))
    assert versus_frame(pd.concat([slow, slow.assign(T=256)]))[1][0].startswith("No crossover measured")


def test_cuda_graphs_are_refused_where_they_cannot_run():
    assert "CPU" in graphs_refusal(SweepSpec(methods=("race",), lengths=(1024,), device="cpu"))
    assert "--mode decode" in graphs_refusal(SweepSpec(methods=("race",), lengths=(1024,), device="cuda",
                                                       mode="decode", causal=True))
    assert "--nproc" in graphs_refusal(SweepSpec(methods=("race",), lengths=(1024,), device="cuda", nproc=2))
    assert graphs_refusal(SweepSpec(methods=("race",), lengths=(1024,), device="cuda")) is None
    result = runner.invoke(app, ["sweep", "--device", "cpu", "--cuda-graphs", "--methods", "race", "--lengths", "1K"])
    assert result.exit_code == 2 and "--cuda-graphs replays passes on a GPU" in result.output
    assert "Traceback" not in result.output


def test_graph_points_are_never_compared_with_eager_ones(tmp_path):
    """cuda_graphs is one of compare's keys: a graph run against an eager baseline matches no point."""
    _, base = load_run(two_softmax_run(tmp_path / "run"), samples=True)
    assert not base.cuda_graphs.any()  # rows record the protocol (eager here)
    same = compare_runs(base, base.copy())
    graphed = compare_runs(base, base.assign(cuda_graphs=True))
    assert not same.regressions
    assert graphed.regressions and all("missing" in str(r) for r in graphed.regressions)


def test_profile_of_a_pass_on_the_cpu():
    profile = load_benchmark("profile_pass")
    r = profile.profile_pass("race", device="cpu", T=256, H=2, D=32, passes=2, repeats=3)
    assert r["wall_ms"] > 0 and r["aten_ops"] > 10 and r["host_ms"] > 0
    assert r["launches"] is None and r["syncs"] is None  # CUDA-only counts are absent, not zero
    assert r["allocations"] > 0


def test_peer_targets_read_off_the_h200_runs(capsys):
    """The H200 runs committed before this work: the script must find their figures (2.51 ms at 2^12, a
    crossover with SDPA's flash near 9,500 tokens, 2.13x the copy time at 2^22, causal 2.68x non-causal at 2^20)."""
    targets = load_benchmark("peer_targets")
    runs = [str(H200 / r) for r in ("paper-gpu-race", "paper-gpu-others", "causal-gpu")]
    targets.main([*runs, "--ceilings", str(H200 / "ceilings.json")])
    out = capsys.readouterr().out
    _, causal = load_run(H200 / "causal-gpu")
    cross = versus_fastest(causal, "race", "softmax")[1]["cuda"]
    assert f"| causal crossover against the fastest softmax | about {round(cross):,} tokens | <= 4,096 tokens | " \
           "not met |" in out
    _, race = load_run(H200 / "paper-gpu-race")
    t = race[(race.method == "race") & (race["T"] == 4096)].time_ms.iloc[0]
    assert f"| race at 2^12, non-causal | {t:.3f} ms | <= 0.5 ms | not met |" in out
    assert "missing: no causal race run to its OOM threshold" in out
