"""linear-fla: the adapter to flash-linear-attention's kernel. fla's Triton kernels do not run on Triton's CPU
interpreter (they call .to() on loop indices), so on the CPU the adapter runs fla's own naive recurrent function in
the kernel's place: same signature, same [B, T, H, D] layout, same normalization. The kernel itself is checked
against the float64 reference by test_methods' CUDA test wherever fla and a GPU are present."""

import pytest
import torch
from conftest import qkv

from racebench.methods import linear_fla
from racebench.methods.linear import elu_features, quadratic_attention
from racebench.methods.registry import get_method

naive = pytest.importorskip("fla.ops.linear_attn.naive", reason="fla-core not installed (it is a dev dependency)")


@pytest.mark.parametrize("T", [1, 63, 300])
def test_adapter_matches_our_float64_linear_attention(check_close, T):
    """Layout, features and normalization of the adapter against `linear`'s own reference in float64. fla's naive
    function computes in fp32 whatever the inputs, so the bar is fp32's."""
    q, k, v = qkv(2, 3, T, 32, scale=0.5)

    def adapter(q, k, v):
        return linear_fla.fla_linear_attention(q, k, v, kernel=naive.naive_recurrent_linear_attn)

    errors = check_close(adapter, linear_fla.fla_reference, q, k, v, tol=2e-5)
    assert max(errors.values()) < 2e-5
    # The method's reference is `linear`'s attention up to fla's smaller epsilon.
    with torch.no_grad():
        ours = quadratic_attention(elu_features(q), elu_features(k), v, causal=True)
        assert (linear_fla.fla_reference(q, k, v) - ours).abs().max() < 1e-5


def test_the_adapter_passes_fla_its_layout():
    """fla takes [B, T, H, D] and elu+1 features; the output comes back as [B, H, T, D]."""
    seen = {}

    def kernel(q, k, v, normalize):
        seen.update(shapes=[tuple(x.shape) for x in (q, k, v)], normalize=normalize, positive=bool((q > 0).all()))
        return v * 2, None

    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    o = linear_fla.fla_linear_attention(q, k, v, kernel=kernel)
    assert seen == {"shapes": [(2, 5, 3, 4)] * 3, "normalize": True, "positive": True}
    assert torch.equal(o, v * 2)


def test_registration():
    m = get_method("linear-fla")
    assert m.family == "linear" and not m.noncausal and m.causal
    assert "cpu not supported" in m.availability("cpu")


def test_missing_fla_is_named(monkeypatch):
    monkeypatch.setattr(linear_fla, "HAS_FLA", False)
    assert "fla-core" in linear_fla._unavailable("cuda")
