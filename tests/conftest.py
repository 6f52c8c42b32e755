import importlib.util
import os
import random
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
    """Fresh random q, k, v that require grad, from the test's own seed (the `seeded` fixture)."""
    return [(torch.randn(B, H, T, D, dtype=torch.float64) * scale).to(dtype).requires_grad_() for _ in range(3)]


def out_and_grads(fn, q, k, v, grad_out):
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), grad_out.to(o.dtype)))


def errors_against_float64(fn, ref, q, k, v, grad_out):
    """rel_err of fn's output and q, k, v gradients against ref's on float64 copies of the inputs, by name."""
    got = out_and_grads(fn, q, k, v, grad_out)
    want = out_and_grads(ref, *(x.detach().double().requires_grad_() for x in (q, k, v)), grad_out.double())
    return {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, want)}


@pytest.fixture
def check_close():
    """racebench.testing.check_close: fn against the float64 reference `ref` by the flash-attention rule (at most
    twice the error `ref` makes in fn's dtype, plus `tol`)."""
    from racebench.testing import check_close

    return check_close


SEED_ENV = "RACEBENCH_TEST_SEED"


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test draws fresh random inputs from a seed of its own, printed when it fails; RACEBENCH_TEST_SEED=N
    replays it."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**31))
    request.node.racebench_seed = seed
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seed = getattr(item, "racebench_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random inputs", f"seed {seed}: replay with {SEED_ENV}={seed} pytest {item.nodeid}"))


def _poisoned(make):
    def make_poisoned(*args, **kwargs):
        t = make(*args, **kwargs)
        if t.is_floating_point() or t.is_complex():
            with torch.no_grad():
                t.fill_(float("nan"))
        return t
    return make_poisoned


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Fresh torch.empty memory holds NaN in tests, so a kernel that leaves part of an output unwritten fails."""
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        monkeypatch.setattr(owner, name, _poisoned(getattr(owner, name)))
