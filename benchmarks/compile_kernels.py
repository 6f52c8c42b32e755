"""Compile racebench's Triton kernels for an H100 (sm_90) ahead of time, on any machine, and report each one's
registers, spill stack and shared memory. Exits 1 if one fails to compile or needs more shared memory than a
block may have.

    python benchmarks/compile_kernels.py [--dtype bf16,fp32] [--json FILE]

Triton's interpreter checks what the kernels compute, not whether the GPU compiler takes them; shapes a
tensor-core product refuses, or too much shared memory, only show here. The variants are the ones a sweep
launches: D = 128, S = 24 (P = L = 3), both normalizations, with the launch options in effect (launch.py; set
RACEBENCH_KERNEL_CONFIG to check another configuration). Needs triton (its NVIDIA backend carries ptxas and
cuobjdump), not a GPU; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from racebench.methods.race import DEFAULT_L, DEFAULT_P, kernels, make_planes
from racebench.methods.race.fused import CHUNK, _Hash, _vprec
from racebench.methods.registry import DTYPES

H100_SHARED_BYTES = 232_448  # the most shared memory one block may use on sm_90 (227 KiB)
KERNELS = ("state_kernel", "out_kernel", "dq_kernel", "dkv_kernel", "causal_fwd_kernel", "causal_dq_kernel",
           "causal_dkv_kernel")
IO = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # [N, T, D] tensors in the input dtype
D = 128


def signature(fn, io_type: str, constexprs: dict) -> dict:
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name == "WP":  # W's bf16 parts for bf16 inputs, W itself (fp32) otherwise
            return "*bf16" if io_type == "bf16" else "*fp32"
        if name in IO:
            return "*" + io_type
        if name in ("beta", "eps"):
            return "fp32"
        if name in ("T", "D", "S") or (name[0].islower() and not name.startswith(("dA", "dKV", "dZ"))):
            return "i32"
        return "*fp32"  # states, hash matrices, denominators, scratch

    return {name: kind(name) for name in fn.arg_names}


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", out) for key in ("REG", "STACK")}
    return {key.lower(): int(m.group(1)) if m else None for key, m in found.items()}


def compile_one(name: str, io_type: str, paper: bool) -> dict:
    fn = getattr(kernels, name)
    # The sizes, precision and launch options the launcher uses for the swept shape, taken from it.
    meta = _Hash(make_planes(DEFAULT_L, DEFAULT_P, D), D, "cpu").meta(_vprec(DTYPES[io_type]), name)
    consts = {k: v for k, v in meta.items() if k in fn.arg_names}
    consts.update({"PAPER": paper} if "PAPER" in fn.arg_names else {})
    consts.update({"C": CHUNK} if "C" in fn.arg_names else {})
    options = {k: v for k, v in meta.items() if k in ("num_warps", "num_stages")}
    src = ASTSource(fn, signature(fn, io_type, consts),
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return dict(kernel=name, dtype=io_type, normalize="paper" if paper else "bucket", **options,
                BT=consts.get("BT"), shared=compiled.metadata.shared, **resources(compiled.asm["cubin"]))


def _compile_or_error(variant) -> dict:
    name, io_type, paper = variant
    try:
        return compile_one(name, io_type, paper)
    except Exception as exc:  # report every variant, then fail
        return dict(kernel=name, dtype=io_type, normalize="paper" if paper else "bucket",
                    error=f"{type(exc).__name__}: {exc}"[-500:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--json", help="also write the table to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles in parallel")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    variants = [(name, io_type, paper) for io_type in args.dtype.split(",") for name in KERNELS
                for paper in ((True, False) if "PAPER" in getattr(kernels, name).arg_names else (True,))]
    rows, failed = [], False
    with ProcessPoolExecutor(args.jobs) as pool:  # each compile is single-threaded
        for row in pool.map(_compile_or_error, variants):
            fits = "error" not in row and row["shared"] <= H100_SHARED_BYTES
            failed |= not fits
            rows.append(row | dict(ok=fits))
            print(f"{'ok  ' if fits else 'FAIL'} {row['kernel']:18s} {row['dtype']} {row['normalize']:6s} "
                  + (f"warps {row['num_warps']} stages {row['num_stages']} BT {row['BT'] or '-':>2} "
                     f"regs {row['reg']} spill-stack {row['stack']} B shared {row['shared']} B"
                     if "error" not in row else row["error"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
