"""The Triton kernels compile for an H100 (sm_90) within its shared memory, specialized as a run launches them:
benchmarks/compile_kernels.py, run in a process of its own because the interpreter the other kernel tests use
(TRITON_INTERPRET=1) cannot compile. Needs no GPU: Triton's NVIDIA backend compiles ahead of time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from racebench.methods.registry import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]
# Each kernel's strides along D: 1 for the sweeps' contiguous inputs and, once fused.py has turned it into one
# broadcast row, for the protocol loss's output gradient (sgd). Specialized to 1, they let loads and stores move
# 16 bytes at a time.
UNIT_STRIDES = {"state_kernel": {"skd", "svd"}, "out_kernel": {"sqd", "sod"}, "dq_kernel": {"sqd", "sgd", "sdd"},
                "dkv_kernel": {"skd", "svd", "sdd"}, "causal_fwd_kernel": {"sd"}, "causal_dq_kernel": {"sd", "sgd"},
                "causal_dkv_kernel": {"sd", "sgd"}, "decode_step_kernel": {"sqd", "skd", "svd", "sod"}}


@pytest.mark.slow  # minutes on 2 cores; `make test` and CI run it, `pytest -m "not slow"` leaves it out
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_kernels.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    rows = json.loads(out.read_text()) if out.exists() else []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Per dtype (bf16, fp32): state and dkv once, the other six twice (normalizations): 14, each compiled once
    # for both layouts of the output gradient, broadcast and dense, which specialize alike. Every one compiled,
    # none over shared memory.
    assert len(rows) == 28 and all(r["ok"] for r in rows)
    assert all(r["grad"] in ("-", "broadcast+dense") for r in rows)
    assert {r["kernel"] for r in rows} == set(UNIT_STRIDES)
    assert all(r["shared"] > 0 and r["reg"] for r in rows)
    for r in rows:
        assert UNIT_STRIDES[r["kernel"]] <= set(r["ones"]), r
        assert "D" in r["aligned"], r
