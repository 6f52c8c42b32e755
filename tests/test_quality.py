"""racebench quality: the MQAR generator's invariants, training that learns with every method, the run folder and
its figures, and bad input."""

import pytest
import torch
from typer.testing import CliRunner

from racebench.cli import app
from racebench.quality.mqar import IGNORE, max_pairs, mqar
from racebench.quality.train import TrainConfig, train

runner = CliRunner()
ENV = {"COLUMNS": "200"}


@pytest.mark.parametrize("T, pairs", [(32, 1), (64, 8), (128, 32), (256, 16), (128, 31)])
def test_mqar_sequences_hold_what_the_task_says(T, pairs):
    vocab = 256
    data = mqar(50, T, pairs, vocab=vocab, seed=torch.randint(1 << 30, ()).item())
    x, y = data.inputs, data.labels
    assert x.shape == y.shape == (50, T)
    keys, values = x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2]
    assert ((keys >= 1) & (keys < vocab // 2)).all() and ((values >= vocab // 2) & (values < vocab)).all()
    assert all(len(set(row.tolist())) == pairs for row in keys)  # keys distinct within a sequence
    for n in range(50):
        answers = (y[n] != IGNORE).nonzero().flatten()
        assert len(answers) == pairs and (answers >= 2 * pairs).all()  # every key queried once, after the pairs
        pair_of = dict(zip(keys[n].tolist(), values[n].tolist()))
        for t in answers.tolist():
            assert y[n, t] == pair_of[x[n, t].item()]  # the label at a query is the value paired with its key
            assert x[n, t + 1] == y[n, t]  # and the value follows it, as in a real sequence
        rest = torch.ones(T, dtype=torch.bool)
        rest[: 2 * pairs] = False
        rest[answers] = False
        assert (x[n][rest] >= vocab // 2).all()  # filler is never a key
    with pytest.raises(ValueError):
        mqar(2, T, max_pairs(T) + 1)


def test_gaps_follow_a_power_law_short_ones_likelier():
    data = mqar(400, 256, 4, seed=1)
    gaps = ((data.labels != IGNORE).nonzero()[:, 1] - 8) // 2
    assert (gaps < 16).float().mean() > 2 * 16 / 124  # far more short gaps than a uniform draw gives


@pytest.mark.parametrize("method", ["flash", "race", "linear", "performer"])
def test_a_few_training_steps_lower_the_loss_for_every_method(method):
    cfg = TrainConfig(T=32, pairs=(2, 4), steps=60, batch=16, d_model=32, eval_every=30, eval_n=32, lr=3e-3,
                      seed=torch.randint(1 << 20, ()).item())
    result = train(method, cfg)
    losses = result["losses"]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < 0.95 * sum(losses[:10]) / 10, losses
    assert set(result["final"]) == {2, 4} and all(0 <= a <= 1 for a in result["final"].values())


def test_the_command_writes_a_run_its_table_and_figures(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["quality", "--methods", "flash,linear", "--lengths", "32", "--pairs", "2,4,16",
                                 "--steps", "20", "--d-model", "16", "--out", str(out)], env=ENV)
    assert result.exit_code == 0, result.output
    assert "2 pairs" in result.output and "16 pairs" not in result.output  # 16 pairs do not fit in 32 tokens
    from racebench.results.store import load_run

    meta, df = load_run(out)
    assert meta["kind"] == "quality" and len(df) == 4 and (df.status == "ok").all() and "losses" not in df
    _, full = load_run(out, samples=True)
    assert all(len(x) == 20 for x in full.losses)
    result = runner.invoke(app, ["plot", str(out), "--out", str(tmp_path / "plots")], env=ENV)
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"quality-accuracy.png", "quality-loss.png"}
    # the softmax model's q, k, v: fidelity's `model` inputs
    assert (out / "model-flash-T32.pt").is_file() and not (out / "model-linear-T32.pt").exists()
    fid = tmp_path / "fidelity"
    result = runner.invoke(app, ["fidelity", "--methods", "linear,angular", "--inputs", "model", "--model", str(out),
                                 "--lengths", "32", "-H", "2", "-D", "16", "--draws", "1", "--no-time", "--out",
                                 str(fid)], env=ENV)
    assert result.exit_code == 0, result.output
    _, scored = load_run(fid)
    assert (scored.status == "ok").all() and (scored.inputs == "model").all() and (scored.err_softmax > 0).all()
    for args, message in ((["--lengths", "64"], "up to 32 tokens"), (["-D", "8"], "give --head-dim 16"),
                          (["--model", str(tmp_path)], "no saved model in it")):
        base = ["fidelity", "--methods", "linear", "--inputs", "model", "--model", str(out), "--lengths", "32",
                "-D", "16", "--out", str(tmp_path / "bad")]
        result = runner.invoke(app, base + args, env=ENV)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    result = runner.invoke(app, ["fidelity", "--inputs", "model", "--out", str(tmp_path / "bad")], env=ENV)
    assert result.exit_code == 2 and "--inputs model needs --model" in result.output


@pytest.mark.parametrize("args, message", [
    (["--methods", "linformer"], "linformer has no causal form"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--pairs", "0"], "--pairs must be positive"),
    (["--pairs", "a,b"], "--pairs takes comma-separated whole numbers"),
    (["--pairs", "64", "--lengths", "128"], "none fits the lengths"),
    (["--pairs", "32", "--lengths", "256"], "holds 31 distinct keys"),
    (["--steps", "0"], "--steps and --d-model must be positive"),
    (["--preset", "huge"], "unknown quality preset"),
    (["--knob", "race_L=0"], "--race-L takes 1 to 4096"),
])
def test_bad_quality_input_is_one_line_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["quality", "--out", str(tmp_path / "r"), *args], env=ENV)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("method", ["flash", "race", "linear", "performer"])
def test_the_gpu_preset_sizes_train_on_the_cpu(method):
    """--preset gpu has not run on a GPU here: its model and task sizes (the longest length, every pair count, its
    vocabulary and width) take training steps with every method on the CPU, at a small batch."""
    from racebench.quality.runner import PRESETS

    p = PRESETS["gpu"]
    T = int(p["lengths"].split(",")[-1])
    pairs = tuple(int(x) for x in p["pairs"].split(","))
    cfg = TrainConfig(T=T, pairs=pairs, steps=2, batch=2, d_model=p["d_model"], vocab=p["vocab"], eval_n=2,
                      eval_every=10, seed=torch.randint(1 << 20, ()).item())
    assert cfg.usable_pairs() == pairs  # every pair count fits the length and the vocabulary
    result = train(method, cfg)
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert set(result["final"]) == set(pairs)


def test_the_gpu_preset_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = runner.invoke(app, ["quality", "--preset", "gpu"], env=ENV)
    assert result.exit_code == 2 and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
