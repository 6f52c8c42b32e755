"""The Triton kernels compile for an H100 (sm_90) within its shared memory: benchmarks/compile_kernels.py,
run in a process of its own because the interpreter the other kernel tests use (TRITON_INTERPRET=1) cannot
compile. Needs no GPU: Triton's NVIDIA backend compiles ahead of time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from racebench.methods.registry import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_kernels.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    rows = json.loads(out.read_text()) if out.exists() else []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 7 kernels, 5 with two normalizations, in bf16 and fp32: every one compiled, none over shared memory.
    assert len(rows) == 24 and all(r["ok"] for r in rows)
    assert all(r["shared"] > 0 and r["reg"] for r in rows)
