"""The sweep engine's CUDA paths, natively (skipped without a GPU; scripts/gpu-check.sh runs them): a point's
time is read after the device has finished (so it cannot undercut the memory traffic), peak memory is the
caching allocator's, the memory budget is enforced below the device's own size, a CUDA out-of-memory is recorded
as such and stops longer lengths, and FlashAttention runs through SDPA's flash backend (flash-attn's when
importable), beside the cuDNN and memory-efficient backends; the protocol's loss makes no fp32 copy of a bf16
output."""

import pytest
import torch

from racebench.bench import runner
from racebench.bench.runner import run_sweep
from racebench.bench.spec import build_spec
from racebench.bench.worker import SumLoss, measure_point
from racebench.methods.registry import HAS_FLASH_ATTN
from racebench.results.store import load_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PAPER = dict(device="cuda", dtype="bf16", heads=4, head_dim=128, warmup=1, repeats=2, time_budget="60s")
# Faster than any GPU's memory moves bytes (an H100 copies at about 3 TB/s, an H200 about 4.5).
BYTES_PER_S_BOUND = 8e12


def spec(**kw):
    return build_spec(**(PAPER | kw))


@pytest.fixture(autouse=True)
def whole_device():
    """measure_point caps this process's share of the device, and blocks cached by earlier tests would count
    against the cap: start from an empty cache, and give the tests after it the whole device back."""
    torch.cuda.empty_cache()
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def test_cuda_point_time_waits_for_the_device_and_peak_is_the_allocators():
    T = 2**18
    row = measure_point(spec(methods="race", lengths=str(T)), "race", T)
    assert row["status"] == "ok", row.get("error")
    assert row["impl"] == "triton"
    tensor = 4 * T * 128 * 2
    # A pass reads q, k, v twice and writes o, dq, dk, dv: 10 tensors at least, at most BYTES_PER_S_BOUND. A
    # clock read before the device finished would see only the launches (tens of microseconds).
    assert row["time_ms_min"] * 1e-3 >= 10 * tensor / BYTES_PER_S_BOUND
    assert row["time_ms_min"] <= row["time_ms"] <= row["time_ms_max"]
    assert row["floor_bytes"] == 7 * tensor
    assert 0.95 * row["floor_bytes"] <= row["peak_mem_bytes"] <= 1.5 * row["floor_bytes"]


def test_cuda_memory_budget_is_enforced_and_oom_recorded():
    # softmax-naive's [1, 4, T, T] scores are 2 GiB in bf16 at 2^14: over a 1 GiB budget, far under the device.
    assert torch.cuda.get_device_properties(0).total_memory > 16 * 2**30
    s = spec(methods="softmax-naive", lengths="2^10,2^14", memory_budget="1GiB")
    assert measure_point(s, "softmax-naive", 2**10)["status"] == "ok"
    row = measure_point(s, "softmax-naive", 2**14)
    assert row["status"] == "oom", row
    assert "out of memory" in row["error"].lower()


def test_cuda_sweep_records_oom_and_skips_longer_lengths(tmp_path):
    """The same through the sweep: each point in a child forked from racebench's server, as CUDA sweeps run."""
    assert runner._context("cuda").get_start_method() == "forkserver"  # forked children can use CUDA here
    s = spec(methods="softmax-naive", lengths="2^10,2^14,2^15", memory_budget="1GiB")
    run_sweep(s, tmp_path / "run")
    meta, df = load_run(tmp_path / "run")
    assert list(df.status) == ["ok", "oom", "skipped"], df.error.tolist()
    assert "out of memory" in df.error.iloc[1].lower()
    assert meta["environment"]["gpu"] == torch.cuda.get_device_name(0)
    assert meta["spec"]["memory_budget_bytes"] == 2**30
    assert meta["point_start_method"] == "forkserver"


@pytest.mark.parametrize("method", ["flash", "sdpa-efficient", "sdpa-cudnn"])
def test_cuda_attention_backends_run(method):
    row = measure_point(spec(methods=method, lengths="2^12"), method, 2**12)
    assert row["status"] == "ok", row.get("error")
    if method == "flash":
        assert row["impl"] == ("flash_attn.flash_attn_func" if HAS_FLASH_ATTN else "sdpa-flash")
    assert row["peak_mem_bytes"] > 0


def test_cuda_protocol_loss_reads_bf16_output_without_an_fp32_copy():
    """The protocol's loss on a bf16 output allocates next to nothing: no fp32 copy of any piece (each copy of a
    64M-element piece would take 256 MiB and move five times the output's bytes in the timed step)."""
    out = (torch.rand(2**27, device="cuda") + 0.5).bfloat16()  # two pieces; a sum far from 0, checked to 1e-5
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = SumLoss.apply(out)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 2**20
    assert abs(loss.item() - out.double().sum().item()) <= 1e-5 * out.double().sum().item()


@pytest.mark.parametrize("method", ["race", "flash", "linear"])
def test_cuda_graph_protocol_replays_the_pass(method):
    """--cuda-graphs: the pass captured once and timed as replays; the replay's output agrees with the eager pass
    (the worker checks it and records an error otherwise), the row says cuda_graphs, and a replay is no slower than
    an eager pass of the same point by more than the noise (it drops the host's launch work)."""
    T = 2**12
    graphed = measure_point(spec(methods=method, lengths=str(T), cuda_graphs=True, repeats=10), method, T)
    eager = measure_point(spec(methods=method, lengths=str(T), repeats=10), method, T)
    assert graphed["status"] == "ok", graphed.get("error")
    assert graphed["cuda_graphs"] is True and eager["cuda_graphs"] is False
    tensor = 4 * T * 128 * 2
    assert graphed["time_ms_min"] * 1e-3 >= 4 * tensor / BYTES_PER_S_BOUND  # the replay waited for the device
    assert graphed["time_ms"] <= 1.5 * eager["time_ms"]
