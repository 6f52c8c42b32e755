"""The command line through typer's CliRunner."""

from typer.testing import CliRunner

from racebench.cli import app

runner = CliRunner()


def test_methods_lists_every_method_with_availability():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("race", "race-paper", "flash", "linear", "performer", "linformer", "angular"):
        assert name in result.output
    assert "needs CUDA" in result.output or "sdpa-cudnn" in result.output


def test_unknown_command_is_a_usage_error():
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2
