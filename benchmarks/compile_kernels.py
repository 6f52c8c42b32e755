"""Compile racebench's Triton kernels for an H100 (sm_90) ahead of time, on any machine, exactly as a run
launches them, and report each one's registers, spill stack and shared memory. Exits 1 if one fails to compile
or needs more shared memory than a block may have.

    python benchmarks/compile_kernels.py [--dtype bf16,fp32] [--grad broadcast,dense] [--json FILE]

Triton's interpreter checks what the kernels compute, not whether the GPU compiler takes them; shapes a tensor-core
product refuses, or too much shared memory, only show here. What is compiled is what fused.py launches: a forward
and backward of race_fused on CPU tensors of a sweep's shape (B=1, H=4, D=128, P=L=3), and a decode step, run with
each kernel's launch replaced by a capture, and each captured launch is specialized as Triton's JIT would specialize
it (integer arguments equal to 1 become constants, pointers and integers divisible by 16 say so: unit strides and
aligned rows are what let loads and stores move 16 bytes at a time, and a compile without them reports other
registers and spills than the GPU runs). Variants: both normalizations, causal and not, the output gradient as the
sweeps' protocol loss hands it on (a broadcast view, --grad broadcast) and as a dense tensor (dense), with the
launch options in effect (launch.py; set RACEBENCH_KERNEL_CONFIG to check another configuration). Needs triton (its
NVIDIA backend carries ptxas and cuobjdump), not a GPU; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime import jit

from racebench.bench.worker import SumLoss
from racebench.methods.race import DEFAULT_L, DEFAULT_P, kernels, make_planes
from racebench.methods.race.fused import race_fused, race_fused_step
from racebench.methods.race.generate import RaceState, _hashed_state
from racebench.methods.registry import torch_dtype

H100_SHARED_BYTES = 232_448  # the most shared memory one block may use on sm_90 (227 KiB)
TARGET = GPUTarget("cuda", 90, 32)
KERNELS = ("state_kernel", "out_kernel", "dq_kernel", "dkv_kernel", "causal_fwd_kernel", "causal_dq_kernel",
           "causal_dkv_kernel", "decode_step_kernel")
SHAPE = (1, 4, 4096, 128)  # T does not matter: no kernel specializes on it (do_not_specialize)
COMPILE_OPTIONS = ("num_warps", "num_stages")


@contextlib.contextmanager
def captured_launches():
    """Within the block, launching a kernel of kernels.py compiles and runs nothing: its specialization (what
    Triton's JIT would compile for those arguments) is appended to the list yielded."""
    backend = make_backend(TARGET)
    launches: list[dict] = []

    def capture(fn):
        binder = jit.create_function_from_signature(fn.signature, fn.params, backend)

        def run(*args, grid, warmup, **kwargs):
            bound, specialization, options = binder(*args, **kwargs)
            _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            launches.append(dict(kernel=fn.__name__, signature=signature, constexprs=constexprs, attrs=attrs,
                                 options={k: kwargs[k] for k in COMPILE_OPTIONS if k in kwargs}))

        return run

    fns = [getattr(kernels, name) for name in KERNELS]
    for fn in fns:
        fn.run = capture(fn)  # an instance attribute: fn[grid](...) calls self.run
    try:
        yield launches
    finally:
        for fn in fns:
            del fn.run


def launched(io_type: str, grad: str) -> list[dict]:
    """Every kernel launch of a forward and backward of race in `io_type`, causal and not, both normalizations,
    with the output gradient `grad` ("broadcast": the protocol's loss; "dense"); main() keeps one of each."""
    dtype = torch_dtype(io_type)
    planes = make_planes(DEFAULT_L, DEFAULT_P, SHAPE[-1])
    found: list[dict] = []
    for causal in (False, True):
        for normalize in ("paper", "bucket"):
            q, k, v = (torch.zeros(SHAPE, dtype=dtype, requires_grad=True) for _ in range(3))
            with captured_launches() as launches:
                o = race_fused(q, k, v, planes, beta=8.0, causal=causal, normalize=normalize)
                if grad == "broadcast":
                    SumLoss.apply(o).backward()
                else:
                    o.backward(torch.zeros_like(o))
                if causal:  # a decode step, its token sliced out of inputs as a sweep slices it
                    state = RaceState(*_hashed_state(k[..., :1, :].detach(), v[..., :1, :].detach(), planes, 8.0),
                                      triton=True)
                    race_fused_step(state, *(x.detach()[..., 1:2, :] for x in (q, k, v)), planes, beta=8.0,
                                    paper=normalize == "paper", eps=1e-6)
            for launch in launches:
                paper = launch["constexprs"].get((kernels_arg(launch["kernel"], "PAPER"),))
                launch.update(dtype=io_type, normalize={True: "paper", False: "bucket", None: "-"}[paper],
                              grad=grad if "DO" in getattr(kernels, launch["kernel"]).arg_names else "-")
            found += launches
    return found


def kernels_arg(kernel: str, name: str) -> int | None:
    names = getattr(kernels, kernel).arg_names
    return names.index(name) if name in names else None


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", out) for key in ("REG", "STACK")}
    # Static count of machine instructions (each loop body counted once): a rough gauge of the work per tile.
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))
    return {key.lower(): int(m.group(1)) if m else None for key, m in found.items()} | dict(sass=instructions)


def compile_launch(launch: dict) -> dict:
    """Compile one captured launch for sm_90; its row of the report (with "error" if it failed)."""
    fn = getattr(kernels, launch["kernel"])
    row = {k: launch[k] for k in ("kernel", "dtype", "normalize", "grad")} | launch["options"]
    row["BT"] = launch["constexprs"].get((kernels_arg(launch["kernel"], "BT"),))
    # What the JIT specialized: arguments that became the constant 1, and those known divisible by 16.
    row["ones"] = [fn.arg_names[i] for (i,) in launch["constexprs"] if not fn.params[i].is_constexpr]
    row["aligned"] = [fn.arg_names[i] for (i,), attr in launch["attrs"].items() if ["tt.divisibility", 16] in attr]
    try:
        compiled = triton.compile(ASTSource(fn, launch["signature"], launch["constexprs"], launch["attrs"]),
                                  target=TARGET, options=launch["options"])
        return row | dict(shared=compiled.metadata.shared, **resources(compiled.asm["cubin"]))
    except Exception as exc:  # report every variant, then fail
        return row | dict(error=f"{type(exc).__name__}: {exc}"[-500:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--grad", default="broadcast,dense", help="comma-separated: broadcast, dense")
    parser.add_argument("--json", help="also write the table to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles in parallel")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    todo: dict[str, dict] = {}
    for io_type in args.dtype.split(","):
        for grad in args.grad.split(","):
            for launch in launched(io_type, grad):
                # The same specialization is one compile: a kernel that takes no output gradient under either
                # --grad, and one that does where both layouts specialize alike (fused.py hands the kernels a
                # broadcast gradient with unit stride along D, like a dense one).
                key = repr([launch[k] for k in ("kernel", "signature", "constexprs", "attrs", "options")])
                if key not in todo:
                    todo[key] = launch
                elif grad not in todo[key]["grad"].split("+") and launch["grad"] != "-":
                    todo[key]["grad"] += "+" + grad
    rows, failed = [], False
    with ProcessPoolExecutor(args.jobs) as pool:  # each compile is single-threaded
        for row in pool.map(compile_launch, todo.values()):
            fits = "error" not in row and row["shared"] <= H100_SHARED_BYTES
            failed |= not fits
            rows.append(row | dict(ok=fits))
            print(f"{'ok  ' if fits else 'FAIL'} {row['kernel']:18s} {row['dtype']} {row['normalize']:6s} "
                  f"dO {row['grad']:15s} "
                  + (f"warps {row['num_warps']} stages {row['num_stages']} BT {row['BT'] or '-':>2} "
                     f"regs {row['reg']} spill-stack {row['stack']} B shared {row['shared']} B sass {row['sass']}"
                     if "error" not in row else row["error"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
