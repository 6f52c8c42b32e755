"""The native CPU kernels (native.py, csrc/race_cpu.cpp) against the float64 specification, and how race picks
them. Skipped, and shown as skipped, where they cannot be built (no C++ compiler)."""

import pytest
import torch
from conftest import errors_against_float64, qkv, rel_err

from racebench import make_planes, race_attention
from racebench.errors import UsageError
from racebench.methods.race import native
from racebench.methods.race.lean import race_lean
from racebench.methods.race.naive import race_naive
from racebench.methods.registry import BuildConfig, get_method

needs_build = pytest.mark.skipif(not native.available(), reason=f"native kernels not built: {native.build_error()}")
NORMS = ["paper", "bucket"]


@needs_build
@pytest.mark.parametrize("normalize", NORMS)
@pytest.mark.parametrize("T", [1, 63, 257])
@pytest.mark.parametrize("D", [60, 64, 128])  # a general head dimension, and the two compiled as constants
def test_native_matches_spec_float64(check_close, normalize, T, D):
    q, k, v = qkv(2, 3, T, D)
    planes = make_planes(3, 3, D, seed=int(torch.randint(1000, ()))).double()
    kw = dict(beta=2.0, causal=False, normalize=normalize)
    check_close(lambda q, k, v: race_attention(q, k, v, planes, impl="cpp", **kw),
                lambda q, k, v: race_naive(q, k, v, planes, **kw), q, k, v, tol=1e-10)


@needs_build
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("L,P", [(2, 2), (5, 4), (1, 9), (7, 1)])
@pytest.mark.parametrize("D", [64, 128])
def test_native_hash_shapes(check_close, D, L, P, dtype):
    """Feature counts S = L * 2^P and hyperplane counts L * P that fill no whole SIMD vector, several of them, or
    the largest the kernels take, through the register-blocked products (D = 64, 128) in both precisions."""
    q, k, v = qkv(1, 2, 100, D, dtype=dtype)
    planes = make_planes(L, P, D, seed=int(torch.randint(1000, ()))).to(dtype)
    kw = dict(beta=4.0, causal=False, normalize="paper")
    check_close(lambda q, k, v: race_attention(q, k, v, planes, impl="cpp", **kw),
                lambda q, k, v: race_naive(q, k, v, planes, **kw), q, k, v,
                tol=1e-10 if dtype == torch.float64 else 1e-5)


@needs_build
@pytest.mark.parametrize("normalize", NORMS)
def test_native_long_sequence_fp32(normalize):
    """2^16 tokens in fp32 against the float64 PyTorch core: sums over long sequences keep their precision."""
    T, D = 2**16, 128
    q, k, v = qkv(1, 2, T, D, dtype=torch.float32)
    planes = make_planes(3, 3, D, seed=1)
    kw = dict(beta=8.0, causal=False, normalize=normalize)
    errors = errors_against_float64(lambda q, k, v: race_attention(q, k, v, planes, impl="cpp", **kw),
                                    lambda q, k, v: race_lean(q, k, v, planes.double(), **kw),
                                    q, k, v, torch.randn(1, 2, T, D))
    for name, err in errors.items():
        assert err < 1e-5, name


@needs_build
def test_native_takes_a_broadcast_output_gradient():
    """The protocol's loss hands the output gradient on as a stride-0 view; the kernels read it in place."""
    q, k, v = (x.detach().requires_grad_() for x in qkv(1, 2, 300, 64))
    planes = make_planes(3, 3, 64, seed=2).double()
    grads = []
    for impl in ("cpp", "torch"):
        for x in (q, k, v):
            x.grad = None
        race_attention(q, k, v, planes, beta=8.0, impl=impl).sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-12


@needs_build
def test_race_runs_native_kernels_on_cpu_where_they_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "query_forward", lambda *a: calls.append("native"))
    q = torch.randn(1, 1, 8, 16)
    race_attention(q, q, q, make_planes(3, 3, 16), beta=8.0)
    race_attention(q, q, q, make_planes(3, 3, 16), beta=8.0, causal=True)  # the PyTorch core
    race_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), make_planes(3, 3, 16), beta=8.0)
    assert calls == ["native"]
    race = get_method("race")
    assert race.impl(BuildConfig(1, 4, 64, 16)) == "cpp"
    assert race.impl(BuildConfig(1, 4, 64, 16, causal=True)) == "torch"
    assert race.impl(BuildConfig(1, 4, 64, 16, dtype=torch.bfloat16)) == "torch"
    assert get_method("race-torch").impl(BuildConfig(1, 4, 64, 16)) == "torch"


def test_without_a_build_race_runs_the_pytorch_core(monkeypatch):
    monkeypatch.setattr(native, "_build", lambda: (None, "RuntimeError: no C++ compiler"))
    q = torch.randn(1, 1, 8, 16)
    planes = make_planes(3, 3, 16)
    assert rel_err(race_attention(q, q, q, planes, beta=8.0), race_lean(q, q, q, planes, beta=8.0)) == 0
    assert get_method("race").impl(BuildConfig(1, 4, 64, 16)) == "torch"
    with pytest.raises(UsageError, match="no C\\+\\+ compiler"):
        race_attention(q, q, q, planes, beta=8.0, impl="cpp")


def test_builds_are_kept_apart_by_the_cpu_s_vectors(monkeypatch):
    """-march=native builds for this CPU and the kernels size their vectors by its widest extension: a build made
    on an AVX-512 machine would not run on an AVX2 one, so the build folder's key includes it."""
    from racebench.methods.race import native as mod

    here = mod._build_dir()
    other = "avx2" if mod.simd() == "avx512f" else "avx512f"
    monkeypatch.setattr(mod, "simd", lambda: other)
    assert mod._build_dir() != here
