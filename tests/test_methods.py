"""Every registered method against a float64 reference of its own definition: outputs and gradients."""

import sys
import types

import pytest
import torch
from conftest import qkv

from racebench.errors import UnavailableError, UnsupportedError, UsageError
from racebench.methods import BuildConfig, build_method, get_method, list_methods
from racebench.methods.registry import HAS_TRITON, has_cuda
from racebench.methods.softmax import softmax_naive

HAS_CUDA = has_cuda()


def softmax_reference(q, k, v, causal):
    return softmax_naive(q, k, v, causal=causal)


CASES = [(m.name, causal) for m in list_methods() for causal in (False, True)
         if m.availability("cpu") is None and (m.causal if causal else m.noncausal)]


@pytest.mark.parametrize("T", [1, 63, 257])
@pytest.mark.parametrize("name, causal", CASES, ids=[f"{n}-{'causal' if c else 'noncausal'}" for n, c in CASES])
def test_method_matches_float64_reference(check_close, name, causal, T):
    D = 60
    cfg = BuildConfig(B=2, H=2, T=T, D=D, dtype=torch.float32, causal=causal, seed=torch.randint(1000, ()).item())
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
    check_close(fn, get_method(name).reference(cfg), q, k, v, tol=1e-5 if T > 1 else 5e-4)


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
                      seed=torch.randint(1000, ()).item())
    fn = build_method(name, cfg)
    q, k, v = (x.detach().cuda().requires_grad_() for x in qkv(1, 2, T, D, dtype=torch.bfloat16, scale=0.5))
    check_close(fn, get_method(name).reference(cfg), q, k, v, tol=2e-2)


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


def test_race_beyond_its_triton_limits_is_unsupported_on_cuda():
    """A configuration a method cannot take is `unsupported` with the reason, asked of the record (no GPU
    needed): race's Triton kernels take up to 64 features and D <= 256."""
    race = get_method("race")
    cfg = BuildConfig(1, 4, 4096, 128, dtype="bf16", device="cuda", knobs={"race_L": 8, "race_P": 4})
    if HAS_TRITON:
        assert "up to 64 features (L * 2**P), not 128" in race.supports(cfg)
        wide = BuildConfig(1, 4, 4096, 512, dtype=torch.bfloat16, device="cuda")
        assert "D <= 256, not 512" in race.supports(wide) and "race-torch runs it" in race.supports(wide)
    torch_only = get_method("race-torch").supports(cfg)
    assert torch_only is None or "needs CUDA" in torch_only
