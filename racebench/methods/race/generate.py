"""Inference with RACE: a causal prefill over the prompt that also returns race's state, then one token at a time
from that state. The state is A = sum_j phi(k_j) [B, H, S] and KV = sum_j phi(k_j) v_j^T [B, H, S, D], the same
size at any context length (softmax attention reads a K, V cache that grows with it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from racebench.methods.race import native
from racebench.methods.race.functional import _validate, race_attention, resolve_impl
from racebench.methods.race.hashing import soft_hash
from racebench.methods.race.lean import race_lean_prefill

_PREFILL_BLOCK = 2**14  # tokens per block when summing the prompt's state: no [T, S] tensor over the whole prompt


@dataclass
class RaceState:
    A: torch.Tensor  # [B, H, S], fp32 (fp64 for fp64 inputs), as race_attention accumulates
    KV: torch.Tensor  # [B, H, S, D]
    W: torch.Tensor | None = None  # the planes as [L*P, D] for the native decode step, made once
    triton: bool = False  # steps through the Triton decode kernel (where the prefill ran the Triton kernels)

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.KV.nbytes


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def race_prefill(q, k, v, planes, *, beta, normalize="paper", eps=1e-6, impl="auto"):
    """(the causal outputs over the prompt [B, H, T, D], the state after it). The PyTorch core returns the state
    from its own pass; after the Triton kernels (or where the outputs need autograd) the prompt's keys are hashed
    once more to sum it."""
    _validate(q, k, v, planes, beta, normalize)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    triton = resolve_impl(q, planes, True, impl) == "triton"
    if not needs_grad and not triton:
        out, A, KV = race_lean_prefill(q, k, v, planes, beta=beta, normalize=normalize, eps=eps)
    else:
        out = race_attention(q, k, v, planes, beta=beta, causal=True, normalize=normalize, eps=eps, impl=impl)
        A, KV = _hashed_state(k, v, planes, beta)
    state = RaceState(A, KV, triton=triton)
    if not triton and native_step(state, planes):
        state.W = planes.to(A.device, A.dtype).reshape(-1, q.shape[-1]).contiguous()
    return out, state


def _hashed_state(k, v, planes, beta):
    """A [B, H, S], KV [B, H, S, D] summed over the keys, hashed in blocks of _PREFILL_BLOCK tokens."""
    acc = _acc(k.dtype)
    B, H, T, D = k.shape
    S = planes.shape[0] * 2 ** planes.shape[1]
    A = torch.zeros(B, H, S, dtype=acc, device=k.device)
    KV = torch.zeros(B, H, S, D, dtype=acc, device=k.device)
    w = planes.to(k.device, acc)
    with torch.no_grad():
        for start in range(0, T, _PREFILL_BLOCK):
            fk = soft_hash(k[..., start:start + _PREFILL_BLOCK, :].to(acc), w, beta)  # [B, H, block, S]
            A += fk.sum(-2)
            KV += fk.transpose(-1, -2) @ v[..., start:start + _PREFILL_BLOCK, :].to(acc)
    return A, KV


def native_step(state: RaceState, planes) -> bool:
    """Whether a step runs the native CPU kernels' decode_step (one call for all heads) rather than PyTorch ops."""
    from racebench.methods.race.implementations import native_limits
    from racebench.methods.registry import dtype_name

    L, P, _ = planes.shape
    return (state.A.device.type == "cpu" and native_limits(dtype_name(state.A.dtype), L, P) is None
            and native.available())


def race_decode_step(state: RaceState, q, k, v, planes, *, beta, normalize="paper", eps=1e-6):
    """One token (q, k, v [B, H, 1, D]): adds its key to the state (in place), then its output [B, H, 1, D]. A step
    is tiny work: one call for all heads of the native kernels on the CPU where they are built, or of the Triton
    decode kernel where the prefill ran the Triton kernels; else a few PyTorch operations (one soft hash for the
    key and the query together, the state updated in place)."""
    if state.triton:
        from racebench.methods.race.fused import race_fused_step

        return race_fused_step(state, q, k, v, planes, beta=beta, paper=normalize == "paper", eps=eps)
    acc = state.A.dtype
    if state.W is not None:  # every Python operation here costs microseconds: none that the kernel can do
        o, dtype = torch.empty(q.shape, dtype=acc), q.dtype  # the kernel reshapes q, k, v, o, the state to rows
        if dtype != acc:
            q, k, v = (x.to(acc) for x in (q, k, v))
        native.decode_step(q, k, v, state.A, state.KV, o, state.W, planes.shape[0], planes.shape[1], beta, normalize,
                           eps)  # not differentiable, so no torch.no_grad() needed
        return o if dtype == acc else o.to(dtype)
    with torch.no_grad():
        f = soft_hash(torch.cat((k, q), dim=-2).to(acc), planes.to(q.device, acc), beta)  # [B, H, 2, S]
        fk, fq = f[..., 0, :], f[..., 1:, :]
        state.A += fk
        state.KV.addcmul_(fk.unsqueeze(-1), v.to(acc))  # += phi(k) v^T: [B, H, S, 1] * [B, H, 1, D]
        if normalize == "paper":
            o = (fq @ state.KV) / (fq @ state.A.unsqueeze(-1) + eps)
        else:  # bucket
            o = (fq / (state.A.unsqueeze(-2) + eps)) @ state.KV
    return o.to(q.dtype)


def race_generate(q, k, v, planes, *, beta, normalize="paper", eps=1e-6, prompt_len):
    """RACE as a model generates with it: the prefill on the first prompt_len tokens, then the rest one token at a
    time from the state; the outputs of every position [B, H, T, D], equal to
    race_attention(q, k, v, planes, beta=beta, causal=True, normalize=normalize, eps=eps)."""
    from racebench.methods.registry import Decoder, decode_all

    _validate(q, k, v, planes, beta, normalize)
    kw = dict(beta=beta, normalize=normalize, eps=eps)
    decoder = Decoder(lambda q, k, v: race_prefill(q, k, v, planes, **kw),
                      lambda state, q, k, v: race_decode_step(state, q, k, v, planes, **kw),
                      lambda state: state.nbytes)
    return decode_all(decoder, q, k, v, prompt_len)
