"""The command line through typer's CliRunner."""

from typer.testing import CliRunner

from racebench.cli import app

runner = CliRunner()


def test_methods_lists_every_method_with_availability_and_knobs():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    for name in ("race", "race-paper", "flash (baseline)", "linear", "performer", "linformer", "angular"):
        assert name in rows, name
    cudnn = rows["sdpa-cudnn"]  # a CUDA-only method: available exactly where CUDA is
    assert ("needs CUDA" in cudnn) != torch.cuda.is_available() and ("yes" in cudnn) == torch.cuda.is_available()
    assert "--performer-features (256)" in rows["performer"] and "--linformer-k (128)" in rows["linformer"]


def test_version():
    from racebench import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"racebench {__version__}"


def test_unknown_command_is_a_usage_error():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2


import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from racebench.results.store import load_run  # noqa: E402


@pytest.mark.parametrize("args, message", [
    (["--methods", "race,nope"], "unknown method 'nope'; known methods:"),
    (["--lengths", "4K,1K"], "strictly increasing"),
    (["--min-len", "0"], "must be positive"),
    (["--min-len", "8K", "--max-len", "1K"], "larger than --max-len"),
    (["--dtype", "fp8"], "--dtype must be one of"),
    (["--memory-budget", "1KB"], "cannot hold even the inputs"),
    (["--time-budget", "soon"], "cannot read duration"),
    (["--mode", "train"], "--mode must be one of"),
    (["--preset", "huge"], "unknown preset"),
    (["--race-normalize", "softmax"], "--race-normalize takes paper | bucket, not 'softmax'"),
    (["--resume"], "--resume needs --out"),
    (["--nproc", "0"], "--nproc must be positive"),
    (["--race-P", "0"], "--race-P takes 1 to 12, not 0"),
    (["--race-P", "30"], "--race-P takes 1 to 12, not 30"),
    (["--race-beta", "-1"], "--race-beta takes 1e-06 to 1e+06, not -1.0"),
    (["--race-beta", "inf"], "--race-beta takes a finite number"),
    (["--methods", "race", "--performer-features", "64"], "--performer-features: no method of this sweep has"),
    (["--methods", "race-paper", "--race-normalize", "paper"], "--race-normalize takes bucket, not 'paper'"),
    (["--nproc", "2", "--mode", "fwd"], "--nproc measures fwd+bwd steps only"),
    (["--plugin", "/nonexistent/plugin.py"], "no such file"),
])
def test_sweep_bad_input_is_one_line_exit_2(args, message):
    result = runner.invoke(app, ["sweep", *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_sweep_cuda_without_cuda():
    result = runner.invoke(app, ["sweep", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_sweep_runs_and_prints_thresholds(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["sweep", "--methods", "race,linear", "--lengths", "64,128", "-H", "1", "-D", "16",
                                 "--repeats", "1", "--warmup", "1", "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Largest context completed per method" in result.output
    meta, df = load_run(out)
    assert meta["command"].startswith("racebench ") and len(df) == 4 and (df.status == "ok").all()


def test_env_prints_environment():
    result = runner.invoke(app, ["env"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "torch" in result.output and "schema_version" in result.output
    assert "dq_kernel: BT=64, num_warps=4, num_stages=1" in result.output  # the kernels' launch, one line each


def test_env_with_a_kernel_configuration(tmp_path, monkeypatch):
    from racebench.methods.race import launch

    path = tmp_path / "launch.json"
    path.write_text('{"dq_kernel": {"num_warps": 8}}')
    monkeypatch.setattr(launch, "_active", None)
    result = runner.invoke(app, ["env"], env={"COLUMNS": "200", launch.ENV: str(path)})
    assert result.exit_code == 0 and "dq_kernel: BT=64, num_warps=8, num_stages=1" in result.output
    path.write_text('{"dq_kernel": {"num_warps": 3}}')
    monkeypatch.setattr(launch, "_active", None)
    result = runner.invoke(app, ["env"], env={"COLUMNS": "200", launch.ENV: str(path)})
    assert result.exit_code != 0 and "num_warps=3 is not a launch option" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setattr(launch, "_active", None)  # later tests read the environment afresh


def test_sweep_nproc_records_ranks(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["sweep", "--methods", "race", "--lengths", "128,512", "-H", "1", "-D", "16",
                                 "--repeats", "1", "--warmup", "1", "--nproc", "3", "--oversubscribe",
                                 "--out", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    _, df = load_run(out)
    assert (df.status == "ok").all() and (df.nproc == 3).all() and (df.comm_bytes_per_step > 0).all()


@pytest.mark.parametrize("dtype, name", [("bfloat16", "bf16"), ("float32", "fp32"), ("half", "fp16"), ("FP64", "fp64")])
def test_dtype_names_as_people_write_them(dtype, name):
    from racebench.bench.spec import build_spec

    assert build_spec(dtype=dtype, device="cpu", lengths="64").dtype == name


def test_a_knob_only_some_methods_take_leaves_the_others_unsupported():
    from racebench.bench.spec import build_spec

    spec = build_spec(methods="race,race-paper", lengths="64", knobs={"race_normalize": "paper"})
    assert spec.unsupported_reason("race") is None
    assert "race-paper: --race-normalize takes bucket, not 'paper'" in spec.unsupported_reason("race-paper")


DEFAULT_RUN = Path(__file__).resolve().parents[1] / "results" / "default-cpu"
_NO_TORCH = """
import sys
from racebench.cli import main
sys.argv = ["racebench", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
assert "torch" not in sys.modules, "torch was imported"
print("no torch")
"""


@pytest.mark.parametrize("args", [["--help"], ["sweep", "--help"], ["report", str(DEFAULT_RUN)]],
                         ids=["help", "sweep-help", "report"])
def test_help_and_report_do_not_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("no torch")
