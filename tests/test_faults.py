"""Faults injected into sweeps, native-kernel builds and run folders: each must end with no orphan process, no hang,
no lost or duplicated point, the right exit code and a one-line message (docs/reliability.md lists them)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from racebench import locks
from racebench.bench import environment
from racebench.bench.runner import run_child, run_sweep
from racebench.bench.spec import build_spec
from racebench.bench.worker import point_row
from racebench.cli import app
from racebench.errors import UsageError
from racebench.methods.race import native
from racebench.results.store import RunStore, load_run, writing

FAULTS = str(Path(__file__).parent / "plugins" / "engine_faults.py")  # test-hang, test-hog, ...
SMALL = ["-H", "1", "-D", "16", "--warmup", "0", "--repeats", "1"]
runner = CliRunner()


def fake_measure(calls: list):
    """A measure function that records which points it was asked for and returns an ok row at once."""
    def measure(spec, method, T):
        calls.append((method, T))
        return point_row(spec, method, T, status="ok", time_ms=1.0 + T / 1e3, peak_mem_bytes=T, repeats=1)
    return measure


def small_spec(**kw):
    return build_spec(**(dict(methods="race,linear", lengths="64,128,256", heads="1", head_dim="16") | kw))


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


# ---- processes: no orphan, whatever kills the sweep --------------------------------------------------------------

def _sweep_process(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "racebench", "sweep", "--plugin", FAULTS, "--out", str(out), *SMALL,
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _point_process(sweep: subprocess.Popen, timeout: float = 90) -> psutil.Process:
    """The process measuring a point: a grandchild of the sweep (sweep -> fork server -> point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.Process(sweep.pid).children(recursive=True):
            try:
                if p.ppid() != sweep.pid:
                    return p
            except psutil.NoSuchProcess:
                continue
        assert sweep.poll() is None, sweep.stderr.read()
        time.sleep(0.2)
    raise AssertionError("no point process started")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_sweep_leaves_no_process_behind(tmp_path, sig):
    sweep = _sweep_process(tmp_path / "run", "--methods", "test-hang", "--lengths", "64", "--time-budget", "10m")
    _point_process(sweep)
    family = psutil.Process(sweep.pid).children(recursive=True)
    os.kill(sweep.pid, sig)
    sweep.wait(30)
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    if sig == signal.SIGTERM:  # an orderly end: the records say so and how to continue
        assert sweep.returncode == 130 and "--resume" in sweep.stderr.read()


def test_a_killed_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = _sweep_process(tmp_path / "run", "--methods", "test-hang,linear", "--lengths", "64", "--time-budget",
                           "10m")
    _point_process(sweep).kill()
    assert sweep.wait(120) == 0, sweep.stderr.read()
    _, df = load_run(tmp_path / "run")
    assert df.set_index("method").status.to_dict() == {"test-hang": "error", "linear": "ok"}
    assert df.error.iloc[0] == "child killed by SIGKILL"


def test_a_second_sweep_on_a_folder_being_written_is_refused(tmp_path):
    out = tmp_path / "run"
    sweep = _sweep_process(out, "--methods", "test-hang", "--lengths", "64", "--time-budget", "10m")
    try:
        _point_process(sweep)
        result = runner.invoke(app, ["sweep", "--resume", "--out", str(out)])
        assert f"being written by another sweep (pid {sweep.pid})" in one_line_error(result)
        result = runner.invoke(app, ["sweep", "--methods", "linear", "--lengths", "64", "--out", str(out)])
        assert f"pid {sweep.pid}" in one_line_error(result)
    finally:
        sweep.kill()
        sweep.wait()
    assert RunStore(out).rows() == []  # neither wrote a point


def test_run_creation_is_atomic(tmp_path):
    out, start, outcomes = tmp_path / "run", threading.Barrier(8), []

    def create():
        start.wait()
        try:
            with writing(out):
                RunStore.create(out, {"run_id": "run"})
                outcomes.append("created")
        except UsageError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("created") == 1, outcomes


# ---- native kernels: built once in the sweep's process, never in a point, no stale lock --------------------------

@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """An empty kernel cache and a fresh build state; the loader replaced by one that records its calls."""
    monkeypatch.setenv("RACEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RACEBENCH_NO_BUILD", raising=False)
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: calls.append(kw) or "module")
    native._build.cache_clear()
    yield calls
    native._build.cache_clear()


def test_a_stale_build_lock_is_cleared(kernel_cache, caplog):
    name, folder = native._build_dir()
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # torch's lock, left by a build killed mid-way: its loader would wait for ever
    caplog.set_level("INFO", logger="racebench")
    assert native._build() == ("module", None)
    assert len(kernel_cache) == 1 and not (folder / "lock").exists()
    assert (folder / "build.json").exists()
    assert "building race's CPU kernels, once per source and compiler" in caplog.text


def test_a_build_in_progress_elsewhere_is_waited_for_then_named(kernel_cache, monkeypatch):
    monkeypatch.setattr(native, "BUILD_WAIT_S", 0.5)
    name, folder = native._build_dir()
    folder.mkdir(parents=True)
    with locks.exclusive(folder / "racebench.lock"):
        module, why = native._build()
    assert module is None and f"pid {os.getpid()} has been building them for over 0.5 s" in why
    assert kernel_cache == []


def test_a_point_process_never_compiles(kernel_cache, monkeypatch):
    monkeypatch.setenv("RACEBENCH_NO_BUILD", "1")
    assert not native.available() and "may not compile" in native.build_error()
    assert kernel_cache == []


def test_built_kernels_are_imported_without_the_loader(monkeypatch):
    """Whatever ninja or checkout built them: a process finds build.json and imports the library directly."""
    native._build.cache_clear()
    if not native.available():
        pytest.skip(f"native kernels not built here: {native.build_error()}")
    native._build.cache_clear()
    monkeypatch.setenv("RACEBENCH_NO_BUILD", "1")
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: pytest.fail("the loader was called"))
    try:
        assert native.available() and native.state() == "built"
    finally:
        native._build.cache_clear()


def test_methods_says_when_the_kernels_cannot_be_built(monkeypatch):
    monkeypatch.setenv("RACEBENCH_CACHE", "/nonexistent-racebench-cache")
    monkeypatch.setenv("CXX", "no-such-compiler-racebench")
    native.compiler.cache_clear()
    try:
        result = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})
    finally:
        native.compiler.cache_clear()
    assert result.exit_code == 0
    assert "native CPU kernels cannot be built: no C++ compiler (no-such-compiler-racebench)" in result.output


# ---- the record: points.jsonl is the truth, results.csv follows it ----------------------------------------------

def test_a_torn_last_line_is_cut_and_its_point_runs_again(tmp_path, caplog):
    out, calls = tmp_path / "run", []
    run_sweep(small_spec(), out, measure=fake_measure(calls))
    log = out / "points.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][:30])  # the last point cut mid-write
    calls.clear()
    run_sweep(small_spec(), out, resume=True, measure=fake_measure(calls))
    assert calls == [("linear", 256)]
    assert "dropped 30 bytes of a point cut short" in caplog.text
    rows = RunStore(out).rows()
    assert sorted((r["method"], r["T"]) for r in rows) == sorted(
        (m, T) for m in ("race", "linear") for T in (64, 128, 256))  # every point once, none lost


def test_a_truncated_results_table_is_rebuilt_from_the_points(tmp_path):
    out = tmp_path / "run"
    run_sweep(small_spec(), out, measure=fake_measure([]))
    csv = out / "results.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:2]))  # one point of six
    result = runner.invoke(app, ["report", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "has 1 points where points.jsonl has 6: rebuilt" in result.output
    assert "linear" in result.output and len(csv.read_text().splitlines()) == 7


def test_a_candidate_missing_points_fails_the_gate(tmp_path):
    base, new = tmp_path / "base", tmp_path / "new"
    run_sweep(small_spec(), base, measure=fake_measure([]))
    run_sweep(small_spec(methods="race"), new, measure=fake_measure([]))
    result = runner.invoke(app, ["compare", str(base), str(new), "--format", "markdown"])
    assert result.exit_code == 1 and "linear T=64: in the baseline (ok), missing from the candidate" in result.output


# ---- what is asked is what runs ---------------------------------------------------------------------------------

def test_a_point_over_its_memory_budget_is_not_ok():
    spec = build_spec(methods="test-hog", lengths="64", heads="1", head_dim="16", warmup="0", repeats="1",
                      memory_budget="64MiB", plugins=[FAULTS])
    row = run_child(spec, "test-hog", 64)
    assert row["status"] == "oom", row
    assert row["peak_mem_bytes"] > 64 * 2**20 and "over the 64.0 MiB memory budget" in row["error"]


def test_resume_with_other_options_is_refused_and_with_the_same_runs(tmp_path):
    out = str(tmp_path / "run")
    first = ["sweep", "--methods", "linear", "--lengths", "64", *SMALL, "--out", out]
    assert runner.invoke(app, first).exit_code == 0
    result = runner.invoke(app, ["sweep", "--resume", "--out", out, "--repeats", "3", "--linear-chunk", "32"])
    line = one_line_error(result)
    assert "--repeats 3 (the run: 1)" in line and "--linear-chunk 32 (the run: 64)" in line
    assert runner.invoke(app, [*first, "--resume"]).exit_code == 0  # the same command again: continues


def test_a_sweep_in_which_nothing_ran_exits_1(tmp_path):
    result = runner.invoke(app, ["sweep", "--methods", "linformer", "--causal", "--lengths", "64", *SMALL,
                                 "--out", str(tmp_path / "run")])
    assert "no point of this sweep ran: linformer unsupported" in one_line_error(result, code=1)


def test_run_json_records_what_reproduces_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["sweep", "--methods", "linear", "--lengths", "64", *SMALL, "--time-budget", "20 s", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/racebench", *args])  # what the process was started with
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "run.json").read_text())
    assert "--time-budget '20 s'" in meta["command"] and meta["cwd"] == os.getcwd()
    env = meta["environment"]
    assert env["numpy"] and env["pandas"] and "gpu_driver" in env
    kernels = env["race_cpu_kernels"]
    assert "-march=native" in kernels["flags"] and kernels["compiler"]["command"] and kernels["folder"]
    assert kernels["simd"]  # what -march=native built for: results from an AVX2 and an AVX-512 CPU differ


def test_a_non_editable_install_records_its_commit(tmp_path, monkeypatch):
    root = Path(__file__).parent.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("racebench-*.whl")
    with zipfile.ZipFile(wheel) as z:
        commit = z.read("racebench/build_commit.txt").decode().strip()
    assert commit == head.stdout.strip()
    package = tmp_path / "installed" / "racebench"  # as installed from that wheel: no checkout around it
    package.mkdir(parents=True)
    (package / "build_commit.txt").write_text(commit + "\n")
    monkeypatch.setattr(environment.racebench, "__file__", str(package / "__init__.py"))
    monkeypatch.setattr(environment, "_git", lambda *args: None)
    assert environment._commit() == (commit, None)


# ---- bad input: one line, exit 2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--out", "{file}"], "cannot make a run folder there"),
    (["--out", "{file}/below"], "cannot make a run folder there"),
    (["--out", "/proc/racebench-run"], "cannot make a run folder there"),
    (["--lengths", "2^20000"], "over 2^40 tokens"),
    (["--warmup", "-3"], "--warmup must be at least 0"),
    (["--rounds", "0"], "--rounds must be positive"),
    (["--nproc", "1000"], "--oversubscribe runs it anyway"),
])
def test_bad_sweep_input(tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    args = [a.format(file=tmp_path / "file") for a in args]
    result = runner.invoke(app, ["sweep", "--methods", "linear", "--lengths", "64", *SMALL, *args])
    assert message in one_line_error(result)


def _spoil(run: Path, fault: str) -> None:
    meta = json.loads((run / "run.json").read_text())
    if fault == "spec without a key":
        del meta["spec"]["methods"]
    elif fault == "run.json a list":
        meta = [meta]
    elif fault == "environment null":
        meta["environment"] = None
    elif fault == "schema version as text":
        meta["environment"]["schema_version"] = "1"
    (run / "run.json").write_text(json.dumps(meta))
    log, csv = run / "points.jsonl", run / "results.csv"
    if fault == "garbage points":
        log.write_bytes(os.urandom(300).replace(b"\n", b"") + b"\n")
        csv.write_bytes(os.urandom(300))
    elif fault == "empty points":
        log.write_text("")
        csv.unlink()
    elif fault == "garbage table only":
        log.unlink()
        csv.write_bytes(b"\x00\xff" * 100)
    elif fault in ("text T", "text time"):
        column, value = ("T", "long") if fault == "text T" else ("time_ms", "fast")
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        rows[0][column] = value
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("fault,command,message", [
    ("spec without a key", "resume", "its spec cannot be read (KeyError: 'methods')"),
    ("run.json a list", "report", "is not a racebench run record"),
    ("environment null", "report", "is not a racebench run record"),
    ("schema version as text", "report", "results schema version '1', this racebench reads 1"),
    ("garbage points", "report", "holds no readable point"),
    ("empty points", "plot", "no finished point yet"),
    ("garbage table only", "report", "is not a results table"),
    ("text T", "report", "column T holds 'long', not a number"),
    ("text time", "plot", "column time_ms holds 'fast', not a number"),
])
def test_bad_run_folder(tmp_path, fault, command, message):
    run = tmp_path / "run"
    run_sweep(small_spec(), run, measure=fake_measure([]))
    _spoil(run, fault)
    args = ["sweep", "--resume", "--out", str(run)] if command == "resume" else [command, str(run)]
    assert message in one_line_error(runner.invoke(app, args, env={"COLUMNS": "250"}))


def test_report_into_an_unwritable_path(tmp_path):
    run = tmp_path / "run"
    run_sweep(small_spec(), run, measure=fake_measure([]))
    result = runner.invoke(app, ["report", str(run), "--markdown", "/proc/racebench/report.md"])
    assert "cannot write /proc/racebench/report.md" in one_line_error(result)
    result = runner.invoke(app, ["report", str(run), "--markdown", "-"])
    assert result.exit_code == 0 and result.output.startswith("#") and not Path("-").exists()
