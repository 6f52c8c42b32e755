"""The test suite's own guards: a failing test names the seed that replays it, and fresh torch.empty memory holds
NaN."""

from pathlib import Path

import torch

pytest_plugins = ["pytester"]
CONFTEST = Path(__file__).with_name("conftest.py")


def test_fresh_empty_memory_holds_nan():
    assert torch.empty(5).isnan().all() and torch.empty_like(torch.ones(3)).isnan().all()
    assert torch.ones(2).new_empty(4).isnan().all()
    assert torch.empty(3, dtype=torch.int64).shape == (3,)  # integers are left as they come


def test_a_failure_prints_its_seed_and_the_seed_replays_it(pytester, monkeypatch):
    monkeypatch.delenv("RACEBENCH_TEST_SEED", raising=False)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_draw="import torch\n\ndef test_draw():\n    print('drew', torch.rand(1).item())\n"
                                  "    assert False\n")
    first = pytester.runpytest_subprocess("-s")
    first.assert_outcomes(failed=1)
    text = first.stdout.str()
    seed = text.split("replay with RACEBENCH_TEST_SEED=")[1].split()[0]
    drew = [line for line in text.splitlines() if line.startswith("drew")]
    monkeypatch.setenv("RACEBENCH_TEST_SEED", seed)
    again = pytester.runpytest_subprocess("-s")
    assert [line for line in again.stdout.str().splitlines() if line.startswith("drew")] == drew
