"""The CPU benchmark scripts run and print their tables (tiny sizes; the figures themselves live in docs/)."""

import re

import pytest
from conftest import load_benchmark

from racebench.methods.race import native


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", line)]


def test_causal_core_compares_grouped_heads_with_one_at_a_time(capsys):
    load_benchmark("causal_core").main(["--shapes", "4x1x64x16", "--repeats", "1"])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| 4x1x64x16 |") and all(x > 0 for x in numbers(row))


def test_race_prefill_compares_its_two_paths(capsys):
    load_benchmark("race_prefill").main(["--lengths", "256", "--repeats", "1"])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| 256 |") and len(numbers(row)) == 1  # the ratio; the times are whole ms


def test_decode_step_splits_a_token_s_cost(capsys):
    if not native.available():
        pytest.skip(f"native kernels not built here: {native.build_error()}")
    load_benchmark("decode_step").main(["--T", "64", "--tokens", "5"])
    rows = capsys.readouterr().out.splitlines()[-4:]
    assert [r.split("|")[1].strip() for r in rows] == ["sweep's step", "race_decode_step", "native kernel alone",
                                                       "PyTorch step"]
    assert all(numbers(r)[0] > 0 for r in rows)


def test_decode_flat_steps_every_length_side_by_side(capsys):
    load_benchmark("decode_flat").main(["--method", "linear", "--lengths", "16,64", "--tokens", "3"])
    rows = capsys.readouterr().out.splitlines()[-2:]
    assert [r.split("|")[1].strip() for r in rows] == ["16", "64"]
    assert rows[0].split("|")[3].strip() == "1.00x"
    assert rows[0].split("|")[4] == rows[1].split("|")[4]  # linear's state does not grow with T
