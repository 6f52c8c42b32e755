"""Correctness checks for any registered method, plugins' included: its build against its float64 reference.

The rule is FlashAttention's: a method may make at most twice the error that its reference makes when run in the
method's own dtype (both measured against the reference in float64), plus `tol`. So float64 inputs must match to
`tol`, and so must a method where the reference overflows in the method's dtype."""

from __future__ import annotations

import math

import torch

from racebench.methods.registry import BuildConfig, build_method, get_method


def outputs_and_grads(fn, q, k, v, grad_out):
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), grad_out.to(o.dtype)))


def _errors(got, want, g):
    # Some gradients are nearly zero in exact arithmetic (dk at T = 1 is O(eps)): measure every error against the
    # larger of the exact value's norm and a hundredth of the incoming gradient's (a wrong gradient is off by the
    # order of the incoming gradient itself).
    return [((a.double() - b).norm() / torch.maximum(b.norm(), 1e-2 * g.norm())).item() for a, b in zip(got, want)]


def check_close(fn, ref, q, k, v, *, tol: float) -> dict[str, float]:
    """Compare outputs and q, k, v gradients of fn against `ref` run in float64 on copies of the same inputs; raises
    AssertionError naming the first tensor over the rule. Returns the errors by name (o, dq, dk, dv)."""
    g = torch.randn_like(q, dtype=torch.float64)
    want = outputs_and_grads(ref, *(x.detach().double().requires_grad_() for x in (q, k, v)), g)
    ours = _errors(outputs_and_grads(fn, q, k, v, g), want, g)
    plain = _errors(outputs_and_grads(ref, *(x.detach().requires_grad_() for x in (q, k, v)), g), want, g)
    for name, err, base in zip(("o", "dq", "dk", "dv"), ours, plain):
        base = base if math.isfinite(base) else 0.0  # the reference overflowed (fp16): fn must meet tol
        assert err <= 2 * base + tol, f"{name}: error {err:.2e} > 2 x {base:.2e} + {tol:.0e}"
    return dict(zip(("o", "dq", "dk", "dv"), ours))


def assert_matches_reference(method: str, *, T: int = 63, causal: bool = False, B: int = 2, H: int = 2, D: int = 60,
                             dtype: torch.dtype = torch.float32, device: str = "cpu", knobs: dict | None = None,
                             seed: int = 0, scale: float = 0.5, tol: float = 1e-5) -> dict[str, float]:
    """Build `method` and its reference (Method.reference) from one configuration, run both on fresh random inputs
    drawn from torch's global generator, and check outputs and gradients by the rule above."""
    record = get_method(method)
    if record.reference is None:
        raise AssertionError(f"method {method!r} has no reference function to test against")
    cfg = BuildConfig(B=B, H=H, T=T, D=D, dtype=dtype, device=device, causal=causal, seed=seed, knobs=knobs or {})
    fn, ref = build_method(method, cfg), record.reference(cfg)
    q, k, v = ((torch.randn(B, H, T, D, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()
               for _ in range(3))
    return check_close(fn, ref, q, k, v, tol=tol)
