"""Users' own methods: the README's "Adding a method" followed to the letter (plugin file and entry point), and bad
plugins refused with one line and exit 2."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import racebench
from racebench.errors import PluginError
from racebench.methods.registry import Knob, Method, get_method, load_plugin, register_method

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--lengths", "64,128", "-H", "1", "-D", "16", "--warmup", "1", "--repeats", "1"]


def readme_plugin() -> str:
    """The python block of the README's "Adding a method" section."""
    section = ROOT.joinpath("README.md").read_text().split("## Adding a method", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def racebench_cli(*args, cwd=None, env=None):
    proc = subprocess.run([sys.executable, "-m", "racebench", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "COLUMNS": "250", **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_attention.py"
    path.write_text(readme_plugin())
    return path


def test_the_readme_plugin_is_listed_with_its_knob(plugin):
    code, out = racebench_cli("methods", "--plugin", plugin)
    assert code == 0, out
    row = next(line for line in out.splitlines() if "│ sigmoid" in line)
    assert "--sigmoid-bias (-5.0)" in row and "yes" in row
    code, out = racebench_cli("sweep", "--plugin", plugin, "--help")
    assert code == 0 and "--sigmoid-bias" in out and "Sigmoid: bias added to every score." in out


def test_the_readme_plugin_sweeps_records_its_knob_and_compares(plugin, tmp_path):
    for name, bias in (("a", "-3"), ("b", "-3"), ("c", "-4")):
        code, out = racebench_cli("sweep", "--plugin", plugin, "--methods", "race,flash,sigmoid", "--sigmoid-bias",
                                  bias, *SMALL, "--out", tmp_path / name)
        assert code == 0, out
    df = pd.read_csv(tmp_path / "a" / "results.csv")
    sigmoid = df[df.method == "sigmoid"]
    assert sigmoid.status.tolist() == ["ok", "ok"] and (sigmoid.sigmoid_bias == -3.0).all()
    assert df[df.method == "race"].sigmoid_bias.isna().all()
    # compare matches on the plugin's knob without loading the plugin (run.json names the knob columns)
    same = racebench.compare(tmp_path / "a", tmp_path / "b", max_slowdown="1000%", max_memory_growth="1000%").points
    other = racebench.compare(tmp_path / "a", tmp_path / "c", max_slowdown="1000%", max_memory_growth="1000%").points
    matched = lambda points: set(points[(points.status_base == "ok") & (points.status_cand == "ok")].method)  # noqa: E731
    assert matched(same) == {"flash", "race", "sigmoid"}
    assert matched(other) == {"flash", "race"}  # sigmoid ran with another bias: not comparable
    assert set(other[other.method == "sigmoid"].verdict) == {"missing", "new"}


def test_the_readme_plugin_matches_its_float64_reference(plugin):
    load_plugin(plugin)
    for causal in (False, True):
        errors = racebench.assert_matches_reference("sigmoid", T=63, causal=causal, knobs={"sigmoid_bias": -1.0})
        assert max(errors.values()) < 1e-5


def test_the_reference_helper_catches_a_wrong_method():
    register_method(Method(name="test-wrong-sigmoid", description="the README's sigmoid, off by a little",
                           build=lambda cfg: lambda q, k, v: get_method("softmax-naive").build(cfg)(q, k, v) * 1.01,
                           reference=get_method("softmax-naive").reference))
    with pytest.raises(AssertionError, match="o: error"):
        racebench.assert_matches_reference("test-wrong-sigmoid", T=31)


def test_an_installed_package_registers_through_its_entry_point(plugin, tmp_path):
    (tmp_path / "my_attention.py").write_text(plugin.read_text())
    info = tmp_path / "my_attention-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-attention\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[racebench.methods]\nsigmoid = my_attention\n")
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    code, out = racebench_cli("methods", env={"PYTHONPATH": path})
    assert code == 0 and "│ sigmoid" in out, out
    code, out = racebench_cli("sweep", "--help", env={"PYTHONPATH": path})
    assert code == 0 and "--sigmoid-bias" in out


BAD = {
    "import-error": ("import no_such_module_anywhere\n", "ModuleNotFoundError"),
    "duplicate": ("from racebench import Method, register_method\n"
                  "register_method(Method(name='race', description='x', build=lambda cfg: None))\n",
                  "method 'race' is registered twice"),
    "bad-knob": ("from racebench import Knob, Method, register_method\n"
                 "register_method(Method(name='x1', description='x', build=lambda cfg: None,\n"
                 "                       knobs=(Knob('bias', float, 0.0, 'no prefix'),)))\n",
                 "knobs are Knob records named prefix_name"),
    "bad-dtype": ("from racebench import Method, register_method\n"
                  "register_method(Method(name='x2', description='x', build=lambda cfg: None,\n"
                  "                       devices={'cpu': ('int8',)}))\n", "devices maps cpu, cuda to dtypes"),
    "nothing": ("x = 1\n", "registers no method"),
}


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_plugin_is_one_line_and_exit_2(kind, tmp_path):
    source, message = BAD[kind]
    path = tmp_path / f"{kind}.py"
    path.write_text(source)
    code, out = racebench_cli("methods", "--plugin", path)
    assert code == 2 and message in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) == 1


def test_register_method_refuses_a_knob_of_another_type():
    with pytest.raises(PluginError, match="knob race_P is a int elsewhere, here a float"):
        register_method(Method(name="test-clash", description="x", build=lambda cfg: None,
                               knobs=(Knob("race_P", float, 1.0, "clash"),)))


def test_a_method_added_as_one_file_in_the_package(plugin, tmp_path):
    """The same file dropped into racebench/methods/ (a copy of the package here) is a built-in method: listed, its
    knob an option, nothing else touched."""
    import shutil

    shutil.copytree(ROOT / "racebench", tmp_path / "racebench", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "racebench" / "methods" / "sigmoid.py").write_text(plugin.read_text())
    env = {"PYTHONPATH": str(tmp_path)}
    code, out = racebench_cli("methods", env=env, cwd=tmp_path)
    assert code == 0 and "│ sigmoid" in out, out
    code, out = racebench_cli("sweep", "--help", env=env, cwd=tmp_path)
    assert code == 0 and "--sigmoid-bias" in out
