"""The committed GitHub workflows: valid against GitHub's workflow schema (check-jsonschema's bundled copy, offline)
and doing what the regression gate needs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

WORKFLOWS = Path(__file__).resolve().parents[1] / ".github" / "workflows"
CHECK = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))


def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def steps_text(job: dict) -> str:
    return "\n".join(str(s.get("run", "")) + str(s.get("uses", "")) for s in job["steps"])


@pytest.mark.parametrize("name", ["tests.yml", "gpu-regression.yml"])
def test_workflow_is_valid_for_github(name):
    proc = subprocess.run([CHECK, "--builtin-schema", "vendor.github-workflows", str(WORKFLOWS / name)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_schema_check_rejects_a_workflow_without_triggers(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("jobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo\n")
    proc = subprocess.run([CHECK, "--builtin-schema", "vendor.github-workflows", str(bad)], capture_output=True)
    assert proc.returncode != 0


def test_cpu_workflow_runs_the_readme_test_command():
    doc = load("tests.yml")
    job = doc["jobs"]["tests"]
    assert job["runs-on"] == "ubuntu-latest" and job["timeout-minutes"] <= 90
    assert "make test" in steps_text(job) and "make test" in (WORKFLOWS.parents[1] / "README.md").read_text()
    assert "pull_request" in doc["on"]


def test_gpu_workflow_sweeps_compares_summarizes_and_uploads():
    doc = load("gpu-regression.yml")
    job = doc["jobs"]["attention-regression"]
    text = steps_text(job)
    assert job["runs-on"] == ["self-hosted", "gpu"] and job["timeout-minutes"] <= 60
    assert "actions/cache" in text and "make install" in text
    assert "racebench sweep --preset ci-gpu" in text
    assert "racebench baseline --device cuda --where" in text
    assert "racebench compare" in text and "--format markdown" in text and "GITHUB_STEP_SUMMARY" in text
    assert "exit $status" in text  # the job fails on a regression
    upload = next(s for s in job["steps"] if "upload-artifact" in s.get("uses", ""))
    assert upload["if"] == "always()" and "results/ci-candidate" in upload["with"]["path"]
