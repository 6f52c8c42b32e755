"""plot, report and compare on small fixture runs: matplotlib objects and exit codes, not pixels."""

import json

import matplotlib.legend
import matplotlib.pyplot as plt
import pytest
from typer.testing import CliRunner

from racebench.bench.runner import run_sweep
from racebench.bench.spec import build_spec
from racebench.cli import app
from racebench.results.store import load_run
from racebench.views.plots import growth_exponent, make_figures

runner = CliRunner()
ENV = {"COLUMNS": "200"}


@pytest.fixture(autouse=True)
def close_figures():
    """make_figures hands its figures to the caller, who closes them: here, after each test."""
    yield
    plt.close("all")


def fixture_run(path, *, scale=1.0, mem_scale=1.0, race_fails_at=None, methods="race,flash,linear",
                memory_budget="1GiB"):
    """A run whose points come from a model of each method (linear or quadratic time), not a measurement."""
    def model(spec, method, T):
        quadratic = method == "flash"
        status = "ok"
        if quadratic and T > 4096:
            status = "timeout"
        if method == "race" and race_fails_at and race_fails_at <= T:
            status = "oom"
        floor = 7 * 4 * T * 16 * 4
        return {"method": method, "T": T, "status": status, "device": "cpu", "dtype": "fp32", "B": 1, "H": 4,
                "D": 16, "causal": False, "mode": "fwd+bwd", "floor_bytes": floor,
                "time_ms": scale * (T * T / 1e5 if quadratic else T / 100), "repeats": 5,
                "time_ms_min": 0.95 * scale * (T * T / 1e5 if quadratic else T / 100),
                "time_ms_max": 1.1 * scale * (T * T / 1e5 if quadratic else T / 100),
                "peak_mem_bytes": mem_scale * floor * (1.1 if method == "race" else 3.0),
                "error": None if status == "ok" else f"{status} here"}

    spec = build_spec(methods=methods, lengths="1K,2K,4K,8K,16K", heads="4", head_dim="16",
                      time_budget="1h", memory_budget=memory_budget)
    run_sweep(spec, path, measure=model)
    return path


@pytest.fixture
def run_dir(tmp_path):
    return fixture_run(tmp_path / "base")


def test_growth_exponent_is_one_for_linear_and_two_for_quadratic(run_dir):
    _, df = load_run(run_dir)
    assert growth_exponent(df[(df.method == "race") & (df.status == "ok")]) == pytest.approx(1.0)
    assert growth_exponent(df[(df.method == "flash") & (df.status == "ok")]) == pytest.approx(2.0)


def test_figures_are_labelled_and_mark_thresholds(run_dir):
    figs = make_figures([load_run(run_dir)])
    ax = figs["time"].axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "context length" in ax.get_xlabel() and "time" in ax.get_ylabel()
    title = ax.get_title(loc="left")
    assert "cpu" in title and "B=1" in title and "non-causal" in title
    methods, marks = (c for c in ax.get_children() if isinstance(c, matplotlib.legend.Legend))
    legend = [t.get_text() for t in methods.get_texts()]
    assert any(t.startswith("race") and "$T^{1.00}$ over $2^{10}$–$2^{14}$" in t for t in legend)  # fit window
    assert any(t.startswith("flash") and "$T^{2.00}$ over $2^{10}$–$2^{12}$" in t for t in legend)
    assert "threshold:flash:time-out" in [line.get_gid() for line in ax.lines if line.get_gid()]
    assert "time-out (first pass)" in [t.get_text() for t in marks.get_texts()]  # what the markers mean
    mem = figs["memory"].axes[0]
    gids = {line.get_gid() for line in mem.lines}
    assert "floor" in gids and "budget:cpu" in gids
    left, right = figs["context"].axes
    assert "largest context" in left.get_xlabel() and "speedup over flash" in right.get_ylabel()


def test_plot_command_writes_files(run_dir, tmp_path):
    result = runner.invoke(app, ["plot", str(run_dir), "--out", str(tmp_path / "p"), "--format", "svg"], env=ENV)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["context.svg", "headline.svg", "memory.svg",
                                                                  "time.svg"]


def test_plot_two_runs_share_a_figure(run_dir, tmp_path):
    other = fixture_run(tmp_path / "other")
    result = runner.invoke(app, ["plot", str(run_dir), str(other), "--out", str(tmp_path / "p")], env=ENV)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "time.png").stat().st_size > 0
    ax = make_figures([load_run(run_dir), load_run(other)])["time"].axes[0]
    assert "2 devices or runs" in ax.get_title(loc="left") and "cpu:base" not in ax.get_title(loc="left")
    methods = next(c for c in ax.get_children() if isinstance(c, matplotlib.legend.Legend))
    assert "race (cpu:other)" in [t.get_text().split("  ")[0] for t in methods.get_texts()]


def test_runs_that_split_one_devices_methods_share_its_name(tmp_path):
    """gpu-check's two non-causal runs: race alone under a 100% budget, the others under the default."""
    race = fixture_run(tmp_path / "race", methods="race", memory_budget="2GiB")
    others = fixture_run(tmp_path / "others", methods="flash,linear")
    figs = make_figures([load_run(race), load_run(others)])
    ax = figs["time"].axes[0]
    methods = next(c for c in ax.get_children() if isinstance(c, matplotlib.legend.Legend))
    assert [t.get_text().split("  ")[0] for t in methods.get_texts()] == ["race", "flash", "linear"]
    assert "cpu," in ax.get_title(loc="left") and "devices or runs" not in ax.get_title(loc="left")
    gids = {line.get_gid() for line in figs["memory"].axes[0].lines}
    assert {"budget:cpu, race", "budget:cpu, others"} <= gids  # each run's own budget, named


def test_report_markdown(run_dir, tmp_path):
    md = tmp_path / "report.md"
    result = runner.invoke(app, ["report", str(run_dir), "--markdown", str(md), "--at", "4K"], env=ENV)
    assert result.exit_code == 0, result.output
    text = md.read_text()
    assert "| race | cpu | fp32 | 2^14 |" in text  # largest length completed
    assert "| flash | cpu | fp32 | 2^12 | 2^13 | time-out |" in text
    assert "## Environment" in text and "torch" in text


def test_report_terminal(run_dir):
    result = runner.invoke(app, ["report", str(run_dir)], env=ENV)
    assert result.exit_code == 0 and "largest T done" in result.output and "Environment" in result.output


def test_compare_passes_an_unchanged_run(run_dir, tmp_path):
    same = fixture_run(tmp_path / "same")
    result = runner.invoke(app, ["compare", str(run_dir), str(same)], env=ENV)
    assert result.exit_code == 0, result.output
    assert "No regression in 15 points" in result.output


def test_compare_flags_a_slowdown(run_dir, tmp_path):
    slow = fixture_run(tmp_path / "slow", scale=1.2)
    result = runner.invoke(app, ["compare", str(run_dir), str(slow), "--max-slowdown", "10%"], env=ENV)
    assert result.exit_code == 1 and "1.20x the baseline time" in result.output


def test_compare_accepts_an_improvement(run_dir, tmp_path):
    fast = fixture_run(tmp_path / "fast", scale=0.5, mem_scale=0.5)
    assert runner.invoke(app, ["compare", str(run_dir), str(fast)], env=ENV).exit_code == 0


def test_compare_flags_memory_growth(run_dir, tmp_path):
    big = fixture_run(tmp_path / "big", mem_scale=1.2)
    result = runner.invoke(app, ["compare", str(run_dir), str(big), "--max-memory-growth", "5%"], env=ENV)
    assert result.exit_code == 1 and "peak memory" in result.output


def test_compare_flags_a_threshold_drop(run_dir, tmp_path):
    worse = fixture_run(tmp_path / "worse", race_fails_at=8192)
    result = runner.invoke(app, ["compare", str(run_dir), str(worse)], env=ENV)
    assert result.exit_code == 1 and "race T=8192: completed in the baseline, now runs out of memory" in result.output
    assert "race: largest completed length fell from 4,096 to" not in result.output  # 2^14 -> 2^12: named below
    assert "race: largest completed length fell from 16,384 to 4,096" in result.output


def test_other_schema_is_refused(run_dir):
    meta = json.loads((run_dir / "run.json").read_text())
    meta["environment"]["schema_version"] = 99
    (run_dir / "run.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["report", str(run_dir)], env=ENV)
    assert result.exit_code == 2 and "schema version 99" in result.output


def test_missing_required_columns_are_refused(run_dir):
    (run_dir / "points.jsonl").unlink()  # a run with a results table only
    (run_dir / "results.csv").write_text("method,T\nrace,1024\n")
    result = runner.invoke(app, ["plot", str(run_dir)], env=ENV)
    assert result.exit_code == 2 and "lack required columns" in result.output


def test_missing_optional_columns_are_tolerated(run_dir, tmp_path):
    import pandas as pd
    (run_dir / "points.jsonl").unlink()  # a run with a results table only, from an older racebench
    df = pd.read_csv(run_dir / "results.csv").drop(columns=["tokens_per_s", "threads", "impl", "race_beta"])
    df.to_csv(run_dir / "results.csv", index=False)
    result = runner.invoke(app, ["report", str(run_dir)], env=ENV)
    assert result.exit_code == 0, result.output


def test_piped_sweep_output_keeps_every_header_and_prints_a_line_per_point(tmp_path):
    result = runner.invoke(app, ["sweep", "--methods", "linear,performer", "--lengths", "64,128", "-H", "1", "-D", "16",
                                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "run")],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for header in ("largest T done", "peak memory", "peak / floor", "threshold", "cause", "performer"):
        assert header in result.output
    assert "…" not in result.output and " 4/4 " not in result.output  # nothing cut; no progress bar in a log
    points = [line for line in result.output.splitlines() if line.startswith(("  linear ", "  performer "))]
    assert len(points) == 4 and all(" ok " in line for line in points)


def test_a_sweep_in_rounds_says_which_round_each_point_is(tmp_path):
    import pandas as pd

    result = runner.invoke(app, ["sweep", "--methods", "linear", "--lengths", "64,128", "-H", "1", "-D", "16",
                                 "--repeats", "2", "--warmup", "0", "--rounds", "3", "--out", str(tmp_path / "run")],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    points = [line for line in result.output.splitlines() if line.startswith("  linear ")]
    assert [line.rstrip()[-9:] for line in points] == [f"round {n}/3" for n in (1, 1, 2, 2, 3, 3)]
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    assert list(table.rounds) == [3, 3] and list(table.repeats) == [6, 6] and "round_ms" not in table


def test_eta_counts_the_later_rounds():
    from racebench.views.progress import Eta

    eta = Eta(build_spec(methods="race", lengths="1K,2K", time_budget="60s", rounds=3))
    eta.record("race", 1024, {"status": "ok", "point_wall_s": 1.0})
    eta.record("race", 2048, {"status": "ok", "point_wall_s": 2.0})
    assert eta.seconds() == pytest.approx(2 * 3.0)  # two more rounds of what the first took
    eta.record("race", 1024, {"status": "ok", "point_wall_s": 1.5}, round_=2)
    assert eta.seconds() == pytest.approx(6.0 - 1.5)


def test_eta_extrapolates_each_method_from_its_finished_points():
    from racebench.views.progress import Eta

    eta = Eta(build_spec(methods="race,linear", lengths="1K,2K,4K,8K", time_budget="60s"))
    eta.record("race", 1024, {"status": "ok", "point_wall_s": 1.0})
    eta.record("race", 2048, {"status": "ok", "point_wall_s": 2.0})
    # race: 4K and 8K at its measured growth (2 s -> 4 s -> 8 s); linear not started: race's mean point, 1.5 s, x 4
    assert eta.seconds() == pytest.approx(4 + 8 + 4 * 1.5)
    eta.record("linear", 1024, {"status": "oom", "point_wall_s": 3.0})  # linear's longer lengths will be skipped
    assert eta.seconds() == pytest.approx(4 + 8)
    eta.record("race", 4096, {"status": "ok", "point_wall_s": 16.0})  # growing as T^3 now: 128 s, over the cap
    assert eta.seconds() == pytest.approx(60 + 15)  # the time budget and the grace the runner gives a point


def _legend_labels(ax) -> list[str]:
    return [t.get_text() for c in ax.get_children() if isinstance(c, matplotlib.legend.Legend) for t in c.get_texts()]


def test_colours_and_markers_follow_the_method_not_the_order(tmp_path):
    one = make_figures([load_run(fixture_run(tmp_path / "a", methods="race,flash,linear"))])["time"].axes[0]
    two = make_figures([load_run(fixture_run(tmp_path / "b", methods="linear,race"))])["time"].axes[0]
    def styles(ax):
        return {line.get_label().split("  ")[0]: (line.get_color(), line.get_marker()) for line in ax.lines
                if not line.get_gid() and not line.get_label().startswith("_")}
    first, second = styles(one), styles(two)
    assert first["race"] == second["race"] and first["linear"] == second["linear"]
    assert len({style for style in first.values()}) == 3  # each method its own colour and marker


H200 = "results/h200-gpu-check-2/"


@pytest.mark.parametrize("runs", [["fixture"], ["results/default-cpu"],
                                  [H200 + "paper-gpu-race", H200 + "paper-gpu-others"], [H200 + "causal-gpu"]],
                         ids=["fixture", "default-cpu", "h200", "h200-causal"])
@pytest.mark.parametrize("style", ["paper", "slides"])
def test_no_text_of_any_figure_overlaps_another(run_dir, runs, style):
    from pathlib import Path

    from racebench.views.plots import FigureOptions, overlapping_texts

    root = Path(__file__).parent.parent
    frames = [load_run(run_dir if r == "fixture" else root / r) for r in runs]
    for name, fig in make_figures(frames, FigureOptions(style=style)).items():
        assert overlapping_texts(fig) == [], name


def test_overlap_check_sees_an_overlap(run_dir):
    from racebench.views.plots import overlapping_texts

    fig = make_figures([load_run(run_dir)])["time"]
    ax = fig.axes[0]
    ax.text(2048, 1.0, "first label")
    ax.text(2048, 1.0, "second label")
    assert ("first label", "second label") in overlapping_texts(fig)


def test_context_panel_says_why_each_method_stopped_and_ends_near_the_data(run_dir, tmp_path):
    worse = fixture_run(tmp_path / "worse", race_fails_at=8192)
    left = make_figures([load_run(worse)])["context"].axes[0]
    stops = {t.get_gid(): t.get_text() for t in left.texts}
    assert stops["stop:race"] == "$2^{12}$, then out of memory"
    assert stops["stop:flash"] == "$2^{12}$, then time-out"
    assert stops["stop:linear"] == "$2^{14}$, the sweep's end"
    assert left.get_xlim()[1] <= 2**14 * 2


def test_headline_figure_marks_the_crossover(tmp_path):
    import pandas as pd

    from racebench.results.summary import crossover

    lengths = [256, 512, 1024, 2048, 4096]
    subject = pd.DataFrame({"T": lengths, "time_ms": [T / 100 for T in lengths]})
    other = pd.DataFrame({"T": lengths, "time_ms": [T * T / 1e5 for T in lengths]})
    assert crossover(subject, other) == pytest.approx(1000)  # where T / 100 = T^2 / 1e5
    assert crossover(other, subject) is None  # never becomes faster
    figs = make_figures([load_run(fixture_run(tmp_path / "run"))])
    labels = _legend_labels(figs["headline"].axes[0])
    assert labels[0].startswith("fastest race (race)") and "largest $2^{14}$, then the sweep's end" in labels[0]
    assert labels[1].startswith("fastest softmax (flash)") and "largest $2^{12}$, then time-out" in labels[1]


def test_plot_options(run_dir, tmp_path):
    from racebench.views.plots import FigureOptions

    figs = make_figures([load_run(run_dir)], FigureOptions(methods=("race", "flash"), title=False, size=(4, 3)))
    ax = figs["time"].axes[0]
    names = [t.split("  ")[0] for t in _legend_labels(ax)]
    assert names[:2] == ["race", "flash"] and "linear" not in names
    assert ax.get_title(loc="left") == "" and tuple(figs["time"].get_size_inches()) == (4, 3)
    assert ax.xaxis.get_major_formatter()(4096, 0) == "$2^{12}$"
    assert "spread:race" in {c.get_gid() for c in ax.collections}  # min to max of the timed passes
    out = tmp_path / "p"
    result = runner.invoke(app, ["plot", str(run_dir), "--out", str(out), "--style", "slides", "--methods", "race",
                                 "--no-title", "--size", "8,5"], env=ENV)
    assert result.exit_code == 0, result.output
    for args, message in ((["--size", "8"], "--size takes width,height"), (["--style", "poster"], "--style must be"),
                          (["--methods", "nosuch"], "nosuch not in these runs")):
        result = runner.invoke(app, ["plot", str(run_dir), "--out", str(out), *args], env=ENV)
        assert result.exit_code == 2 and message in result.output, result.output
