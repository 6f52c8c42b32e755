"""racebench fidelity: the error metrics against hand-computed cases, the references, a run folder like a sweep's,
the theory it must reproduce, and bad input."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from racebench.bench.fidelity import (
    FidelitySpec,
    References,
    attention_weights,
    build_fidelity_spec,
    kl_rows,
    make_inputs,
    relative_error,
    row_cosine,
    uniform_attention,
)
from racebench.bench.fidelity_runner import run_fidelity
from racebench.cli import app
from racebench.methods.registry import BuildConfig, get_method
from racebench.results.store import load_run

runner = CliRunner()
ENV = {"COLUMNS": "200"}


def test_error_metrics_on_hand_computed_cases():
    x = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    assert relative_error(x, x) == 0 and row_cosine(x, x) == pytest.approx(1)
    assert relative_error(1.1 * x, x) == pytest.approx(0.1) and row_cosine(-x, x) == pytest.approx(-1)
    assert relative_error(torch.zeros_like(x), x) == pytest.approx(1)
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    r = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    assert kl_rows(p, p) == pytest.approx(0, abs=1e-15)
    assert kl_rows(p, r) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert kl_rows(p, torch.tensor([[1.5, -0.5]], dtype=torch.float64)) is None  # not a distribution


def test_uniform_attention_is_the_mean_of_the_visible_values():
    v = torch.randn(1, 2, 7, 3, dtype=torch.float64)
    assert torch.allclose(uniform_attention(v, False), v.mean(-2, keepdim=True).expand_as(v))
    causal = uniform_attention(v, True)
    for t in range(7):
        assert torch.allclose(causal[..., t, :], v[..., : t + 1, :].mean(-2))


@pytest.mark.parametrize("method", ["flash", "linear", "angular", "race"])
@pytest.mark.parametrize("causal", [False, True])
def test_weights_read_off_one_hot_values_reproduce_the_output(method, causal):
    """attention_weights: o = A v for every racebench method, with A read from one-hot values, D columns at a time
    (T not a multiple of D on purpose)."""
    q, k, v = make_inputs("gaussian", 1, 2, 37, 8, seed=torch.randint(1 << 30, ()).item())
    fn = get_method(method).build(BuildConfig(1, 2, 37, 8, "fp64", "cpu", causal))
    A = attention_weights(fn, q, k)
    assert torch.allclose(A @ v, fn(q, k, v), atol=1e-10)
    if causal:
        assert A.triu(1).abs().max() < 1e-12
    if method == "flash":
        refs = References(q, k, v, causal, weights=True)
        assert torch.allclose(A, refs["weights"], atol=1e-12)


def test_clustered_inputs_make_softmax_sharp_and_gaussian_ones_broad():
    def entropy(kind):
        q, k, v = make_inputs(kind, 1, 4, 512, 128, seed=3)
        w = References(q, k, v, False, weights=True)["weights"]
        return float(-(w * w.clamp_min(1e-300).log()).sum(-1).mean())

    assert entropy("clustered") < 0.5 * entropy("gaussian")  # nats; uniform would be log(512) = 6.2


def _run(tmp_path, **options):
    options = {"methods": "flash,race,linear,linformer", "lengths": "64,128", "inputs": "gaussian,clustered",
               "draws": 2, "heads": 1, "head_dim": 16, "timed": False} | options
    spec = build_fidelity_spec(**options)
    return run_fidelity(spec, tmp_path / "run").path


def test_a_run_scores_every_method_against_the_references(tmp_path):
    path = _run(tmp_path, grid=["race_L=4,64"], knobs=["race_beta=1000"])
    meta, df = load_run(path)
    assert meta["kind"] == "fidelity" and (path / "points.jsonl").exists() and (path / "results.csv").exists()
    assert len(df) == (1 + 2 + 1 + 1) * 2 * 2 and (df.status == "ok").all()
    flash = df[df.method == "flash"]
    assert (flash.err_softmax < 1e-12).all() and (flash.kl_softmax.abs() < 1e-12).all()
    assert (flash.cos_softmax > 1 - 1e-12).all()
    race = df[df.method == "race"]
    assert race.err_target.notna().all() and df[df.method != "race"].err_target.isna().all()
    by_L = race.groupby("race_L").err_target.mean()
    assert by_L[64] < 0.5 * by_L[4]  # more tables, closer to the angular attention race estimates
    assert df[df.method == "linformer"].kl_softmax.isna().all()  # its weights are not a distribution
    assert (df.floor_softmax > 0).all() and (df.err_softmax_std >= 0).all()
    clustered = df[(df.inputs == "clustered") & (df.method == "linear")].err_softmax.mean()
    assert clustered > df[(df.inputs == "gaussian") & (df.method == "linear")].err_softmax.mean()


def test_unsupported_combinations_are_recorded(tmp_path):
    path = _run(tmp_path, methods="linformer,linear", lengths="64", inputs="gaussian", causal=True)
    _, df = load_run(path)
    assert df.set_index("method").status.to_dict() == {"linformer": "unsupported", "linear": "ok"}
    assert "no causal variant" in df[df.method == "linformer"].error.iloc[0]


def test_each_point_carries_its_time_per_pass(tmp_path):
    path = _run(tmp_path, methods="race,linear", lengths="64", inputs="gaussian", grid=["race_L=1,3"], timed=True,
                draws=1)
    _, df = load_run(path)
    assert df.time_ms.notna().all() and (df.time_status == "ok").all() and (df.time_ms > 0).all()


def test_race_error_against_angular_attention_falls_like_one_over_root_L(tmp_path):
    """The 1/sqrt(L) law of RACE.md at large beta, small enough to test: the fitted slope over L = 4..1024."""
    from racebench.views.fidelity import fit_slope

    path = _run(tmp_path, methods="race", lengths="256", inputs="clustered", draws=3, heads=2, head_dim=32,
                grid=["race_L=4,16,64,256,1024"], knobs=["race_beta=1000"])
    _, df = load_run(path)
    slope = fit_slope(df.race_L, df.err_target)
    assert -0.65 < slope < -0.35, df[["race_L", "err_target"]]


def test_a_resumed_run_finishes_without_repeating_points(tmp_path):
    spec = build_fidelity_spec(methods="linear,flash", lengths="64,128", inputs="gaussian", draws=1, heads=1,
                               head_dim=8, timed=False)
    seen = []

    def stop_after_two(what, row):
        if row is not None:
            seen.append((row["method"], row["T"]))
            if len(seen) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fidelity(spec, tmp_path / "run", progress=stop_after_two)
    seen.clear()
    run_fidelity(spec, tmp_path / "run", resume=True, progress=lambda what, row: row and seen.append(
        (row["method"], row["T"])))
    assert seen == [("linear", 128), ("flash", 128)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "points.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["T"]) for r in rows) == sorted([("linear", 64), ("flash", 64), ("linear", 128),
                                                                 ("flash", 128)])


def test_the_command_writes_a_run_its_table_and_figures(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["fidelity", "--methods", "race,linear", "--lengths", "64", "--inputs", "clustered",
                                 "--grid", "race_L=2,8,32", "--knob", "race_beta=100", "--draws", "1", "-H", "1",
                                 "-D", "16", "--out", str(out)], env=ENV)
    assert result.exit_code == 0, result.output
    assert "against softmax" in result.output and "vs its target" in result.output
    assert "angular attention, gamma = 3" in result.output
    result = runner.invoke(app, ["plot", str(out), "--out", str(tmp_path / "plots")], env=ENV)
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"fidelity-pareto.png", "fidelity-race_L.png"}


@pytest.mark.parametrize("args, message", [
    (["--grid", "race_L"], "write NAME=V1,V2"),
    (["--grid", "nope_x=1,2"], "no method of this run has the knob nope_x"),
    (["--grid", "race_L=0,4"], "--race-L takes 1 to 4096"),
    (["--grid", "race_L=4,4"], "lists a value twice"),
    (["--knob", "race_beta=hot"], "--race-beta takes"),
    (["--inputs", "pictures"], "--inputs takes gaussian, clustered, model"),
    (["--lengths", "2^20"], "at most 2^14"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--draws", "0"], "--draws must be at least 1"),
    (["--preset", "fast"], "unknown fidelity preset"),
])
def test_bad_fidelity_input_is_one_line_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["fidelity", "--methods", "race", "--lengths", "64", "--out", str(tmp_path / "r"),
                                 *args], env=ENV)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_spec_settings_cross_only_the_knobs_a_method_has():
    spec = FidelitySpec(methods=("race", "linear"), lengths=(64,), grid={"race_L": (1, 2), "race_P": (2, 3)},
                        knobs={"race_beta": 50.0})
    assert len(spec.settings("race")) == 4 and all(s["race_beta"] == 50.0 for s in spec.settings("race"))
    assert spec.settings("linear") == [{}]
