"""Launch options of the Triton kernels (racebench/methods/race/launch.py) and how benchmarks/tune_kernels.py
chooses them; no kernel runs here (tests/test_race_triton.py runs the kernels under non-default options)."""

import json

import pytest
from conftest import load_benchmark

from racebench.errors import UsageError
from racebench.methods.race import launch


def test_defaults_and_overrides():
    base = launch.current()
    with launch.overridden({}) as cfg:
        assert {k: cfg[k] for k in launch.DEFAULTS} == launch.DEFAULTS
    with launch.overridden({"dq_kernel": {"num_warps": 8}, "programs_per_sm": 2}) as cfg:
        assert launch.options("dq_kernel")["num_warps"] == 8
        assert launch.options("dq_kernel")["BT"] == launch.DEFAULTS["dq_kernel"]["BT"]  # the rest stays
        assert cfg["programs_per_sm"] == 2
        assert launch.options("out_kernel") == launch.DEFAULTS["out_kernel"]
    assert launch.current() == base  # restored


@pytest.mark.parametrize("bad", [
    {"nope_kernel": {"num_warps": 4}},
    {"dq_kernel": {"num_warps": 3}},
    {"dq_kernel": {"BT": 48}},
    {"causal_fwd_kernel": {"BT": 32}},  # the causal kernels' chunk is not a launch option
    {"dq_kernel": 4},
    {"programs_per_sm": 0},
])
def test_bad_configurations_are_refused(bad):
    with pytest.raises(UsageError):
        launch.validate(bad)


def test_configuration_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"state_kernel": {"BT": 32, "num_stages": 2}}))
    monkeypatch.setenv(launch.ENV, str(path))
    monkeypatch.setattr(launch, "_active", None)
    assert launch.options("state_kernel") == dict(BT=32, num_warps=4, num_stages=2)
    path.write_text("{not json")
    monkeypatch.setattr(launch, "_active", None)
    with pytest.raises(UsageError, match="cannot read"):
        launch.current()
    monkeypatch.setattr(launch, "_active", None)
    monkeypatch.setenv(launch.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(UsageError, match="cannot read"):
        launch.current()
    monkeypatch.setattr(launch, "_active", None)  # the next test reads the environment afresh


def _tuner():
    return load_benchmark("tune_kernels")


def _row(causal, config, kernels, total, error=0.0, label=None):
    tuner = _tuner()
    return dict(causal=causal, config=config, label=label or tuner.label(config),
                result=dict(total_ms=total, kernels_ms=kernels, error=None, max_rel_error=error))


def test_tuner_takes_the_fastest_matching_option_per_kernel():
    tuner = _tuner()
    a = {k: dict(BT=64, num_warps=4, num_stages=1) for k in tuner.NONCAUSAL}
    b = {k: dict(BT=32, num_warps=8, num_stages=2) for k in tuner.NONCAUSAL}
    c = {k: dict(BT=16, num_warps=8, num_stages=1) for k in tuner.NONCAUSAL}
    rows = [
        _row(False, {}, {"dq_kernel": 5.0, "out_kernel": 1.0}, 10.0, label="default"),
        _row(False, a, {"dq_kernel": 5.0, "out_kernel": 1.0}, 10.0),
        _row(False, b, {"dq_kernel": 3.0, "out_kernel": 2.0}, 9.0),
        _row(False, c, {"dq_kernel": 1.0, "out_kernel": 0.5}, 5.0, error=0.5),  # fast but wrong: not taken
        _row(True, {}, {}, 20.0, label="default"),
        _row(False, {"programs_per_sm": 8}, {}, 8.0),
        _row(True, {"programs_per_sm": 8}, {}, 19.0),
        _row(False, {"programs_per_sm": 2}, {}, 4.0),  # faster, but not measured causal: not taken
    ]
    chosen = tuner.best_config(rows, max_error=1e-2)
    assert chosen["dq_kernel"] == b["dq_kernel"] and chosen["out_kernel"] == a["out_kernel"]
    assert chosen["programs_per_sm"] == 8
    launch.validate(chosen)  # what it writes, RACEBENCH_KERNEL_CONFIG takes


def test_tuner_candidates_are_valid():
    tuner = _tuner()
    for causal in (False, True):
        for config in tuner.candidates(causal):
            launch.validate(config)
