import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on Triton's CPU interpreter; it is chosen when triton is imported,
# so it has to be set before any test imports it. On a CUDA machine the same tests run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker would otherwise run a thread per core: on a 16-core GPU machine with 12 workers,
# spinning threads made a float64 reference that takes 0.4 s alone take 160 s.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script benchmarks/NAME.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64: the one error measure every comparison uses."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def qkv(B, H, T, D, dtype=torch.float64, scale=1.0):
    """Fresh random q, k, v that require grad (no fixed seed: every run draws new inputs)."""
    return [(torch.randn(B, H, T, D, dtype=torch.float64) * scale).to(dtype).requires_grad_() for _ in range(3)]


def out_and_grads(fn, q, k, v, grad_out):
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), grad_out.to(o.dtype)))


def errors_against_float64(fn, ref, q, k, v, grad_out):
    """rel_err of fn's output and q, k, v gradients against ref's on float64 copies of the inputs, by name."""
    got = out_and_grads(fn, q, k, v, grad_out)
    want = out_and_grads(ref, *(x.detach().double().requires_grad_() for x in (q, k, v)), grad_out.double())
    return {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, want)}


def _errors(got, want, g):
    # Some gradients are nearly zero in exact arithmetic (dk at T = 1 is O(eps)): measure every error
    # against the larger of the exact value's norm and a hundredth of the incoming gradient's
    # (a wrong gradient is off by the order of the incoming gradient itself).
    return [((a.double() - b).norm() / torch.maximum(b.norm(), 1e-2 * g.norm())).item() for a, b in zip(got, want)]


@pytest.fixture
def check_close():
    """Compare outputs and q, k, v gradients of fn against the float64 reference `ref`.

    The flash-attention rule: fn may make at most twice the error that `ref` itself makes when run in
    fn's input dtype, plus `tol` (so float64 inputs must match to `tol`, and so must fn where plain PyTorch
    overflows in fn's dtype)."""

    def check(fn, ref, q, k, v, *, tol):
        g = torch.randn_like(q, dtype=torch.float64)
        want = out_and_grads(ref, *(x.detach().double().requires_grad_() for x in (q, k, v)), g)
        ours = _errors(out_and_grads(fn, q, k, v, g), want, g)
        plain = _errors(out_and_grads(ref, *(x.detach().requires_grad_() for x in (q, k, v)), g), want, g)
        for name, err, base in zip(("o", "dq", "dk", "dv"), ours, plain):
            base = base if math.isfinite(base) else 0.0  # plain PyTorch overflowed (fp16): fn must meet tol
            assert err <= 2 * base + tol, f"{name}: error {err:.2e} > 2 x {base:.2e} + {tol:.0e}"

    return check
