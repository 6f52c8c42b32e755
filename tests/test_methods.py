"""Every registered method against a float64 reference of its own definition: outputs and gradients."""

import math
import sys
import types

import pytest
import torch
from conftest import qkv

from racebench.errors import UnavailableError, UnsupportedError, UsageError
from racebench.methods import BuildConfig, build_method, get_method, list_methods
from racebench.methods.linear import (
    elu_features,
    favor_features,
    linformer_attention,
    linformer_projections,
    orthogonal_features,
)
from racebench.methods.race import DEFAULT_BETA, make_planes
from racebench.methods.race.naive import race_naive
from racebench.methods.registry import HAS_CUDA


def quadratic_linear(fq, fk, v, causal, eps=1e-6):
    """Linear attention written as its T x T form: the reference for the chunked implementation."""
    w = fq @ fk.transpose(-1, -2)
    if causal:
        w = w.tril()
    return (w @ v) / (w.sum(-1, keepdim=True) + eps)


def softmax_reference(q, k, v, causal):
    T = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s + torch.full((T, T), -math.inf, dtype=s.dtype).triu(1)
    return torch.softmax(s, -1) @ v


def angular_reference(q, k, v, causal, gamma=8.0):
    """Row by row, straight from RACE.md."""
    rows = []
    for t in range(q.shape[-2]):
        stop = t + 1 if causal else q.shape[-2]
        cos = torch.einsum("bhd,bhjd->bhj", q[..., t, :], k[..., :stop, :])
        cos = cos / (q[..., t, :].norm(dim=-1, keepdim=True) * k[..., :stop, :].norm(dim=-1))
        sim = (1 - torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6)) / math.pi) ** gamma
        rows.append(torch.einsum("bhj,bhjd->bhd", sim, v[..., :stop, :]) / (sim.sum(-1, keepdim=True) + 1e-6))
    return torch.stack(rows, -2)


def references(cfg: BuildConfig):
    """method name -> float64 reference built from the same random parameters as the method."""
    c = cfg.causal
    proj = orthogonal_features(256, cfg.D, seed=cfg.seed).double()
    E, F = linformer_projections(cfg.T, 128, seed=cfg.seed).double()
    planes = make_planes(3, 3, cfg.D, seed=cfg.seed).double()
    softmax = lambda q, k, v: softmax_reference(q, k, v, c)  # noqa: E731
    return {
        "race": lambda q, k, v: race_naive(q, k, v, planes, beta=DEFAULT_BETA, causal=c),
        "race-torch": lambda q, k, v: race_naive(q, k, v, planes, beta=DEFAULT_BETA, causal=c),
        "race-paper": lambda q, k, v: race_naive(q, k, v, planes, beta=1 / math.sqrt(cfg.D) if c else 1.0,
                                                 causal=c, normalize="bucket"),
        "angular": lambda q, k, v: angular_reference(q, k, v, c),
        "flash": softmax, "sdpa-math": softmax, "softmax-naive": softmax,
        "sdpa-efficient": softmax, "sdpa-cudnn": softmax, "flash3": softmax,
        "linear": lambda q, k, v: quadratic_linear(elu_features(q), elu_features(k), v, c),
        "performer": lambda q, k, v: quadratic_linear(favor_features(q, proj, is_query=True),
                                                      favor_features(k, proj, is_query=False), v, c),
        "linformer": lambda q, k, v: linformer_attention(q, k, v, E, F),
    }


CASES = [(m.name, causal) for m in list_methods() for causal in (False, True)
         if m.availability("cpu") is None and (m.causal if causal else m.noncausal)]


@pytest.mark.parametrize("T", [1, 63, 257])
@pytest.mark.parametrize("name, causal", CASES, ids=[f"{n}-{'causal' if c else 'noncausal'}" for n, c in CASES])
def test_method_matches_float64_reference(check_close, name, causal, T):
    D = 60
    cfg = BuildConfig(B=2, H=2, T=T, D=D, dtype=torch.float32, causal=causal, seed=torch.seed() % 1000)
    fn = build_method(name, cfg)
    q, k, v = qkv(2, 2, T, D, dtype=torch.float32, scale=0.5)
    if T == 1:
        # The output is v up to O(eps) terms, so the q and k gradients are O(eps) and ill-conditioned: fp32
        # rounding then differs between any two orderings of the same sums by ~1e-4 of the gradient scale, times
        # 1 / (similarity of q and k). For RACE that similarity, phi(q).phi(k), can be ~1e-3 for an independent k,
        # and then any fp32 implementation, the reference's included, returns noise no fixed allowance bounds
        # (300 draws: worst 1.2e-3, 2 over). The single key is the query itself (similarity >= L / 2**P): worst
        # 7.9e-5 over 300 draws. T = 63 and 257 test independent keys.
        k = q.detach().clone().requires_grad_()
    check_close(fn, references(cfg)[name], q, k, v, tol=1e-5 if T > 1 else 5e-4)


CUDA_CASES = [(m.name, causal) for m in list_methods() for causal in (False, True)
              if HAS_CUDA and m.availability("cuda") is None and (m.causal if causal else m.noncausal)]


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA paths need a GPU (scripts/gpu-check.sh runs them)")
@pytest.mark.parametrize("T", [63, 300])
@pytest.mark.parametrize("name, causal", CUDA_CASES,
                         ids=[f"{n}-{'causal' if c else 'noncausal'}" for n, c in CUDA_CASES])
def test_method_on_cuda_matches_float64_reference(check_close, name, causal, T):
    """Every method that runs on CUDA, in bf16 (all of them take it), by the 2x plain-PyTorch rule."""
    D = 64
    cfg = BuildConfig(B=1, H=2, T=T, D=D, dtype=torch.bfloat16, device="cuda", causal=causal,
                      seed=torch.seed() % 1000)
    fn = build_method(name, cfg)
    q, k, v = (x.detach().cuda().requires_grad_() for x in qkv(1, 2, T, D, dtype=torch.bfloat16, scale=0.5))
    ref = references(cfg)[name]  # its parameters live on the CPU: the reference runs there
    check_close(fn, lambda q, k, v: ref(q.cpu(), k.cpu(), v.cpu()).to(q.device), q, k, v, tol=2e-2)


def test_registry_names_are_the_documented_ones():
    names = {m.name for m in list_methods()}
    assert {"race", "race-torch", "race-paper", "angular", "flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
            "softmax-naive", "linear", "performer", "linformer"} <= names


def test_unknown_method_lists_known_ones():
    with pytest.raises(UsageError, match="unknown method 'nope'.*race"):
        get_method("nope")


def test_unsupported_combinations_are_named():
    with pytest.raises(UnsupportedError, match="linformer on cpu in fp32, causal: linformer has no causal"):
        build_method("linformer", BuildConfig(1, 1, 8, 16, causal=True))
    with pytest.raises(UnsupportedError, match="sdpa-cudnn runs only on cuda"):
        build_method("sdpa-cudnn", BuildConfig(1, 1, 8, 16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown on machines without CUDA")
def test_cuda_methods_unavailable_without_cuda():
    assert get_method("sdpa-efficient").availability() == "needs CUDA"
    with pytest.raises(UnavailableError, match="needs CUDA"):
        build_method("race", BuildConfig(1, 1, 8, 16, device="cuda"))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_flash_takes_flash_attn_where_importable(monkeypatch, check_close, causal):
    """flash-attn is installed on no machine these tests run on: a stand-in with its signature and [B, T, H, D]
    layout checks that the adapter hands it that layout and the causal flag, and hands back [B, H, T, D]."""
    from racebench.methods import softmax

    seen = []

    def flash_attn_func(q, k, v, causal=False):
        seen.append((tuple(q.shape), causal))
        o = softmax_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal)
        return o.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    monkeypatch.setattr(softmax, "HAS_FLASH_ATTN", True)
    cfg = BuildConfig(B=2, H=3, T=37, D=16, dtype=torch.float64, device="cuda", causal=causal)
    assert get_method("flash").impl(cfg) == "flash_attn.flash_attn_func"  # what each row records
    check_close(softmax._flash_attn_build(cfg), lambda q, k, v: softmax_reference(q, k, v, causal),
                *qkv(2, 3, 37, 16), tol=1e-12)
    assert seen[0] == ((2, 37, 3, 16), causal)
