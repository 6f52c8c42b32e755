"""The sweep engine at tiny sizes: statuses, isolation, budgets, resume, the results schema."""

import json
import os
import platform
from pathlib import Path

import pytest
import torch

from racebench.bench import runner
from racebench.bench.environment import collect_environment
from racebench.bench.runner import run_child, run_sweep
from racebench.bench.spec import build_spec
from racebench.bench.worker import SumLoss
from racebench.results.schema import columns
from racebench.results.store import load_run
from racebench.results.summary import thresholds

SMALL = dict(heads="1", head_dim="16", warmup="1", repeats="2")
FAULTS = str(Path(__file__).parent / "plugins" / "engine_faults.py")  # test-crash and test-nan


def spec(**kw):
    return build_spec(**(SMALL | kw))


def test_ok_points_and_results_schema(tmp_path):
    s = spec(methods="race,linformer", lengths="64,256", causal=True, time_budget="60s")
    run_sweep(s, tmp_path / "run")
    meta, df = load_run(tmp_path / "run")
    assert list(df.columns[: len(columns())]) == columns()
    assert {"race_P", "race_beta", "performer_features", "linformer_k", "angular_gamma"} <= set(columns())
    race = df[df.method == "race"]
    assert list(race.status) == ["ok", "ok"]
    assert (race.time_ms > 0).all() and (race.time_ms_min <= race.time_ms).all()
    assert (race.time_ms <= race.time_ms_max).all() and (race.repeats == 2).all()
    assert (race.peak_mem_bytes > 0).all() and (race.floor_bytes == 7 * race["T"] * 16 * 4).all()
    assert (race.page_faults_per_pass >= 0).all()  # counted on CPU (None on CUDA)
    assert (race.race_P == 3).all() and (race.race_normalize == "paper").all()
    assert list(df[df.method == "linformer"].status) == ["unsupported"] * 2
    assert (df[df.method == "linformer"].linformer_k == 128).all() and race.linformer_k.isna().all()
    assert meta["knob_columns"] == ["race_P", "race_L", "race_beta", "race_M", "race_normalize", "linformer_k"]
    assert "no causal variant" in df[df.method == "linformer"].error.iloc[0]
    assert meta["point_start_method"] == "forkserver"
    for key in ("schema_version", "racebench_version", "git_sha", "torch", "cpu", "cpu_cores", "ram_bytes",
                "hostname", "utc_time"):
        assert key in meta["environment"]
    assert meta["spec"]["lengths"] == [64, 256]
    assert len((tmp_path / "run" / "points.jsonl").read_text().splitlines()) == 4


def test_oom_stops_longer_lengths(tmp_path):
    # softmax-naive's T x T scores need 4 * T^2 bytes per head: 1 GiB at 16K, far over a 96 MiB budget.
    s = spec(methods="softmax-naive", lengths="256,16K,32K", memory_budget="96MiB", time_budget="60s")
    run_sweep(s, tmp_path / "run")
    _, df = load_run(tmp_path / "run")
    assert list(df.status) == ["ok", "oom", "skipped"]
    assert "can't allocate memory" in df.error.iloc[1]
    assert "oom at T = 16384" in df.error.iloc[2]
    t = thresholds(df).iloc[0]
    assert (t.max_ok_T, t.fail_T, t.cause) == (256, 16384, "OOM")


def test_timeout_after_a_first_pass_over_budget(tmp_path):
    # angular at 4K tokens: a pass takes seconds, far over a 0.2 s budget; the child stops after one pass.
    s = spec(methods="angular", lengths="4K", time_budget="0.2s", heads="4", head_dim="64")
    run_sweep(s, tmp_path / "run")
    _, df = load_run(tmp_path / "run")
    assert df.status.tolist() == ["timeout"] and "would exceed the 0.2 s budget" in df.error.item()


def test_hung_child_is_killed_at_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "GRACE_S", 0.0)
    s = spec(methods="angular", lengths="8K", time_budget="0.5s", heads="4", head_dim="64")
    row = run_child(s, "angular", 8192)
    assert row["status"] == "timeout" and "killed after the 0.5 s time budget" in row["error"]
    assert row["point_wall_s"] < 10


def test_predicted_timeout_is_skipped_without_running(tmp_path):
    calls = []

    def fake(spec_, method, T):
        calls.append(T)
        return {"method": method, "T": T, "status": "ok", "time_ms": T * T / 1e3, "device": "cpu", "dtype": "fp32",
                "B": 1, "H": 1, "D": 16, "causal": False, "mode": "fwd+bwd", "floor_bytes": 1, "peak_mem_bytes": 1}

    s = spec(methods="flash", lengths="1K,2K,4K,8K", time_budget="20s")
    run_sweep(s, tmp_path / "run", measure=fake)
    _, df = load_run(tmp_path / "run")
    # 1K: 1.05 s per pass; quadratic growth predicts 16.8 s per pass at 4K, x 4 passes > 20 s.
    assert calls == [1024, 2048]
    assert df.status.tolist() == ["ok", "ok", "skipped", "skipped"]
    assert df.error.iloc[2].startswith("predicted 16.8 s per pass")


def test_child_killed_by_signal_is_recorded():
    row = run_child(spec(methods="test-crash", lengths="64", plugins=[FAULTS]), "test-crash", 64)
    assert row["status"] == "error" and "SIGKILL" in row["error"]


def test_resume_skips_finished_points(tmp_path):
    s = spec(methods="race,linear", lengths="64,128", time_budget="60s")
    measured = []

    def interrupted(spec_, method, T):
        if len(measured) == 2:
            raise KeyboardInterrupt
        measured.append((method, T))
        return run_child(spec_, method, T)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(s, tmp_path / "run", measure=interrupted)
    _, partial = load_run(tmp_path / "run")
    assert len(partial) == 2  # results.csv written even on interrupt

    resumed = []
    run_sweep(s, tmp_path / "run", resume=True,
              measure=lambda sp, m, T: resumed.append((m, T)) or run_child(sp, m, T))
    assert resumed == [("linear", 64), ("linear", 128)]
    _, df = load_run(tmp_path / "run")
    assert sorted(zip(df.method, df["T"])) == [("linear", 64), ("linear", 128), ("race", 64), ("race", 128)]
    assert (df.status == "ok").all()


def test_refine_bisects_the_threshold(tmp_path):
    def fake(spec_, method, T):
        status = "ok" if T <= 5000 else "oom"
        return {"method": method, "T": T, "status": status, "time_ms": 1.0, "device": "cpu", "dtype": "fp32",
                "B": 1, "H": 1, "D": 16, "causal": False, "mode": "fwd+bwd"}

    s = spec(methods="race", lengths="1K,2K,4K,8K,16K", refine=0.05)
    run_sweep(s, tmp_path / "run", measure=fake)
    _, df = load_run(tmp_path / "run")
    t = thresholds(df).iloc[0]
    assert t.max_ok_T <= 5000 < t.fail_T and t.fail_T / t.max_ok_T - 1 <= 0.05
    assert df[df.refine.astype(bool)].shape[0] >= 3
    assert df[df["T"] == 16384].status.item() == "skipped"


def test_existing_run_is_not_overwritten(tmp_path):
    s = spec(methods="race", lengths="64")
    run_sweep(s, tmp_path / "run")
    from racebench.errors import UsageError
    with pytest.raises(UsageError, match="--resume"):
        run_sweep(s, tmp_path / "run")


def test_environment_is_json_ready(monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1")
    env = json.loads(json.dumps(collect_environment()))
    assert env["thp_mem_alloc_enable"] == "1" and env["malloc_conf"] == "dirty_decay_ms:-1"
    assert env["transparent_hugepage"] in (None, "always", "madvise", "never")
    assert env["race_kernel_launch"]["dq_kernel"]["BT"] in (16, 32, 64)


def test_sequence_parallel_points(tmp_path):
    s = spec(methods="race,linear", lengths="256,1K", nproc=2, oversubscribe=True, causal=True, time_budget="60s")
    run_sweep(s, tmp_path / "run")
    _, df = load_run(tmp_path / "run")
    race = df[df.method == "race"]
    assert race.status.tolist() == ["ok", "ok"] and (race.nproc == 2).all()
    assert (race.impl == "sequence-parallel").all()
    # Bytes per step depend on H, S and D only, never on T: the state is what crosses between ranks.
    assert race.comm_bytes_per_step.nunique() == 1 and race.comm_bytes_per_step.iloc[0] > 0
    assert all(len(json.loads(x)) == 2 for x in race.rank_peak_mem_bytes)
    assert (race.page_faults_per_pass >= 0).all()
    linear = df[df.method == "linear"]
    assert linear.status.tolist() == ["unsupported"] * 2
    assert "linear has no sequence-parallel form" in linear.error.iloc[0]


def test_nonfinite_output_is_recorded():
    row = run_child(spec(methods="test-nan", lengths="64", plugins=[FAULTS]), "test-nan", 64)
    assert row["status"] == "nonfinite" and "NaN" in row["error"]


def test_sequence_parallel_rejects_what_it_cannot_run():
    s = build_spec(methods="race,linear", lengths="256", nproc=2, oversubscribe=True, knobs={"race_M": 2})
    assert "race_M = 1" in s.unsupported_reason("race")
    assert "no sequence-parallel form" in s.unsupported_reason("linear")
    assert build_spec(methods="race", lengths="256", nproc=2, oversubscribe=True).unsupported_reason("race") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_protocol_loss_is_the_published_one_without_temporaries(dtype):
    """SumLoss = out.float().sum() in value and gradient, but its gradient stays a broadcast view in bf16 too
    (the published form materializes one more [B, H, T, D] tensor in the backward)."""
    x = torch.randn(2, 3, 5000, 16).to(dtype).requires_grad_()
    out = x * 3
    seen = []
    out.register_hook(lambda g: seen.append(g.stride()))
    loss = SumLoss.apply(out)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, out.detach().float().sum(), rtol=1e-5)
    loss.backward()
    assert seen == [(0, 0, 0, 0)] and torch.equal(x.grad, torch.full_like(x, 3))


def test_points_fork_from_a_server_and_cuda_points_spawn_where_forks_cannot_use_it(monkeypatch):
    """CUDA cannot be used in a child forked from a process that has initialized it (seen on an H100: every CUDA
    point failed with "Cannot re-initialize CUDA in forked subprocess"): CUDA points fork only where a forked child
    has been seen to use CUDA (tests/test_cuda_engine.py checks that it can on a GPU), else they spawn."""
    assert runner._context("cpu").get_start_method() == "forkserver"
    assert runner._forked_children_use_cuda() == torch.cuda.is_available()  # the probe runs CUDA for real
    monkeypatch.setattr(runner, "_forked_children_use_cuda", lambda: False)
    assert runner._context("cuda").get_start_method() == "spawn"
    monkeypatch.setattr(runner, "_forked_children_use_cuda", lambda: True)
    assert runner._context("cuda").get_start_method() == "forkserver"
    assert os.environ[runner._NVML_CHECK] == "1"  # the server asks NVML, not cuInit, whether CUDA is there


_TIMING_ALLOCATOR = """
import resource, torch
from racebench.bench.memory import CpuMemory
mem = CpuMemory(2**30)
mem.cap()
mem.settle_for_timing()
for mib in (4, 16, 64, 256):
    faults = []
    for _ in range(8):  # small allocations between them decide which repeat finds its old block free
        before = mem.faults()
        torch.ones(mib * 2**18)  # filled, then freed
        faults.append(mem.faults() - before)
    print(mib, min(faults[1:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the timing allocator's settings are glibc's")
def test_timed_passes_allocate_like_a_pytorch_process():
    """Blocks up to 32 MiB come from the heap and are reused; larger tensors are fresh memory on every
    allocation, as in a long-running PyTorch process with glibc's defaults (so a timed pass pays for its outputs'
    pages)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TIMING_ALLOCATOR], capture_output=True, text=True, check=True)
    faults = {int(a): int(b) for a, b in (line.split() for line in out.stdout.splitlines())}
    pages = {mib: mib * 2**20 // 4096 for mib in faults}
    assert faults[4] < pages[4] // 10 and faults[16] < pages[16] // 10
    assert faults[64] >= 0.9 * pages[64] and faults[256] >= 0.9 * pages[256]
