"""RACE on the Triton kernels of kernels.py: the autograd function and the launches.

Non-causal: state_kernel (A, KV per range of keys, summed here) -> out_kernel; backward: dq_kernel (dq and
per-range shares of the state's gradient) -> dkv_kernel. Causal: state_kernel over ranges of `span` tokens,
exclusive prefix sum here = the state entering each range -> causal_fwd_kernel walks each range in chunks;
backward: causal_dq_kernel (dq, and each range's gradient of its entering state) -> suffix sums here ->
causal_dkv_kernel. Saved for the backward: q, k, v, o, the per-range entering states (S * D floats per `span`
tokens) and, for the paper normalization, one denominator per token; features are recomputed. Decoding
(generate.py): race_fused_step, one decode_step_kernel launch per token.

Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (how the tests check it without a GPU).
"""

from __future__ import annotations

import weakref

import torch
import triton

from racebench.errors import UsageError
from racebench.methods.race import kernels, launch
from racebench.methods.race.hashing import corners
from racebench.methods.race.implementations import triton_limits
from racebench.methods.race.lean import exclusive_cumsum, reverse_exclusive_cumsum
from racebench.methods.registry import dtype_name

TILE = 64  # the unit of non-causal ranges; each kernel's own tile (BT, launch.py) divides it
CHUNK = 64  # tokens per exact causal chunk
# Tokens per causal range at most: the saved entering states cost S * D / MAX_SPAN floats per token, and the
# bucket backward's scratch S * D * MAX_SPAN / CHUNK floats per program. Non-causal ranges are not capped.
MAX_SPAN = 1024


def unsupported_reason(q, planes) -> str | None:
    """Why the kernels cannot run these inputs, or None."""
    L, P, D = planes.shape
    return triton_limits(dtype_name(q.dtype), D, L, P)


def race_fused(q, k, v, planes, *, beta, causal=False, normalize="paper", eps=1e-6):
    """RACE attention on [B, H, T, D] through the Triton kernels; same contract as racebench.race_attention."""
    if (why := unsupported_reason(q, planes)) is not None:
        raise UsageError(why + "; use the PyTorch implementation (race-torch, impl='torch')")
    return _FusedRace.apply(q, k, v, planes, float(beta), bool(causal), normalize == "paper", float(eps))


class _Hash:
    """The padded hash parameters the kernels load: W [LPP, BD] and its bf16 parts, G and M [LPP, BS] (see
    kernels.py)."""

    def __init__(self, planes, D, device):
        L, P, _ = planes.shape
        R = 2**P
        self.S, self.LP = L * R, L * P
        self.BD = max(16, triton.next_power_of_2(D))
        self.BS = max(16, triton.next_power_of_2(self.S))
        self.LPP = max(16, triton.next_power_of_2(L * P))
        self.W = torch.zeros(self.LPP, self.BD, dtype=torch.float32)
        self.W[: L * P, :D] = planes.detach().reshape(L * P, D).float().cpu()
        self.G = torch.zeros(self.LPP, self.BS, dtype=torch.float32)
        self.M = torch.zeros(self.LPP, self.BS, dtype=torch.float32)
        negative = (corners(P) < 0).t().float()  # [P, R]: 1 where corner r has c_rp = -1
        for l in range(L):
            self.G[l * P : (l + 1) * P, l * R : (l + 1) * R] = 1
            self.M[l * P : (l + 1) * P, l * R : (l + 1) * R] = negative
        self.W, self.G, self.M = (t.to(device) for t in (self.W, self.G, self.M))
        self.parts = {}

    def args(self, dtype):
        """W, WP, G, M for inputs of `dtype`: WP [3, LPP, BD] holds W as the sum of three bf16 parts
        (kernels._proj) for bf16 inputs, W thrice for the others (unused there)."""
        if dtype not in self.parts:
            if dtype == torch.bfloat16:
                rest, parts = self.W, []
                for _ in range(3):
                    parts.append(rest.to(dtype))
                    rest = rest - parts[-1].float()
                self.parts[dtype] = torch.stack(parts)
            else:
                self.parts[dtype] = self.W.expand(3, -1, -1).contiguous()
        return self.W, self.parts[dtype], self.G, self.M

    def meta(self, vprec, kernel):
        """What launching `kernel` takes besides its arguments: compile-time sizes, precision, launch options."""
        return dict(BD=self.BD, BS=self.BS, LPP=self.LPP, VPREC=vprec, **launch.options(kernel))


_HASHES: dict = {}  # id(planes) -> (weak reference to planes, {(version, D, device): _Hash})


def _hash_for(planes, D, device) -> _Hash:
    """The padded hash parameters of these planes, built once per planes tensor (and its version): building
    them copies to the device, and a host-to-device copy waits for the device, which would stall every call."""
    entry = _HASHES.get(id(planes))
    if entry is None or entry[0]() is not planes:  # the entry leaves with its tensor (the callback)
        entry = (weakref.ref(planes, lambda _, i=id(planes): _HASHES.pop(i, None)), {})
        _HASHES[id(planes)] = entry
    built, key = entry[1], (planes._version, D, str(device))
    if key not in built:
        built.clear()
        built[key] = _Hash(planes, D, device)
    return built[key]


def _vprec(dtype):
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _programs(device):
    """Programs that keep the device busy: a few per streaming multiprocessor (a handful on the interpreter)."""
    per_sm = launch.current()["programs_per_sm"]
    return per_sm * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1)


def _ranges(T, N, device, unit, cap=None):
    """Tokens per program (a multiple of `unit`, at most `cap`) so that the grid fills the device, and the number
    of ranges."""
    per_head = max(1, -(-_programs(device) // N))
    span = unit * max(1, -(-T // (unit * per_head)))
    if cap is not None:
        span = min(span, max(unit, cap))
    return span, -(-T // span)


def _tiles(T, N, device, meta):
    """(span, ranges) of the kernels that need no per-range result (out_kernel, dkv_kernel): one tile per program,
    or with the launch option WALK, ranges as the range-walking kernels take them (the state loaded once per range,
    not per tile)."""
    if meta["WALK"]:
        return _ranges(T, N, device, TILE)
    return meta["BT"], triton.cdiv(T, meta["BT"])


def _as_read(do3):
    """The output gradient as the kernels read it. A broadcast scalar (o.sum().backward(), the protocol's loss)
    has stride 0 everywhere; as one row of D values broadcast over heads and tokens it has unit stride along D,
    which Triton's JIT specializes on (a stride of 0 it does not), so the kernels load it 16 bytes at a time
    rather than element by element. Same values, D elements of memory."""
    if any(do3.stride()) or do3.numel() == 0:
        return do3
    return do3[0, 0].contiguous().as_strided(do3.shape, (0, 0, 1))


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _state(k, v, h, span, n_ranges, beta, vprec):
    """Per-range sums (A [N, ranges, S], KV [N, ranges, S, D]) of phi(k) and phi(k) v^T."""
    N, T, D = k.shape
    A = torch.empty(N, n_ranges, h.S, device=k.device, dtype=torch.float32)
    KV = torch.empty(N, n_ranges, h.S, D, device=k.device, dtype=torch.float32)
    kernels.state_kernel[(n_ranges, N)](k, v, *h.args(k.dtype), A, KV, T, D, h.S, span, beta, *_strides(k),
                                        *_strides(v), **h.meta(vprec, "state_kernel"))
    return A, KV


class _FusedRace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, planes, beta, causal, paper, eps):
        B, H, T, D = q.shape
        N = B * H
        q3, k3, v3 = (x.reshape(N, T, D).contiguous() for x in (q, k, v))
        h, vprec = _hash_for(planes, D, q.device), _vprec(q.dtype)
        o = torch.empty_like(q3)
        if causal:
            span, n_ranges = _ranges(T, N, q.device, CHUNK, MAX_SPAN)
            A, KV = _state(k3, v3, h, span, n_ranges, beta, vprec)
            A0, KV0 = exclusive_cumsum(A, 1), exclusive_cumsum(KV, 1)
            den = torch.empty(N, T if paper else 1, device=q.device, dtype=torch.float32)
            kernels.causal_fwd_kernel[(n_ranges, N)](q3, k3, v3, o, den, *h.args(q.dtype), A0, KV0, T, D, h.S, span,
                                                     beta, eps, *_strides(q3), PAPER=paper, C=CHUNK,
                                                     **h.meta(vprec, "causal_fwd_kernel"))
            ctx.save_for_backward(q3, k3, v3, o, den, A0, KV0)
            ctx.span = span
        else:
            span, n_ranges = _ranges(T, N, q.device, TILE)
            A, KV = (x.sum(1) for x in _state(k3, v3, h, span, n_ranges, beta, vprec))
            Z = KV if paper else KV / (A + eps).unsqueeze(-1)
            meta = h.meta(vprec, "out_kernel")
            span, n_ranges = _tiles(T, N, q.device, meta)
            kernels.out_kernel[(n_ranges, N)](q3, o, *h.args(q.dtype), A, Z, T, D, h.S, span, beta, eps, *_strides(q3),
                                              *_strides(o), PAPER=paper, **meta)
            ctx.save_for_backward(q3, k3, v3, A, Z)
        ctx.h, ctx.vprec, ctx.shape = h, vprec, (B, H, T, D)
        ctx.beta, ctx.causal, ctx.paper, ctx.eps = beta, causal, paper, eps
        return o.view(B, H, T, D)

    @staticmethod
    def backward(ctx, do):
        B, H, T, D = ctx.shape
        N, h, beta, eps, paper = B * H, ctx.h, ctx.beta, ctx.eps, ctx.paper
        vprec = ctx.vprec
        do3 = _as_read(do.reshape(N, T, D))
        if ctx.causal:
            q3, k3, v3, o, den, A0, KV0 = ctx.saved_tensors
            dq, dk, dv = (torch.empty_like(q3) for _ in range(3))
            n_ranges = A0.shape[1]
            dA = torch.empty_like(A0)
            dKV = torch.empty_like(KV0)
            kernels.causal_dq_kernel[(n_ranges, N)](q3, k3, v3, o, do3, dq, den, *h.args(q3.dtype), A0, KV0, dA, dKV,
                                                    T, D, h.S, ctx.span, beta, eps, *_strides(q3), *_strides(do3),
                                                    PAPER=paper, C=CHUNK, **h.meta(vprec, "causal_dq_kernel"))
            # Gradient of the state leaving each range from every later query: an exclusive suffix sum.
            dA_after, dKV_after = reverse_exclusive_cumsum(dA, 1), reverse_exclusive_cumsum(dKV, 1)
            items = N * n_ranges
            programs = min(items, _programs(q3.device))
            n_chunks = ctx.span // CHUNK
            scratch = (1, 1) if paper else (programs, n_chunks, h.BS)  # see causal_dkv_kernel
            SA = torch.empty(scratch, device=q3.device, dtype=torch.float32)
            SKV = torch.empty(*scratch, h.BD if not paper else 1, device=q3.device, dtype=torch.float32)
            kernels.causal_dkv_kernel[(programs,)](q3, k3, v3, o, do3, dk, dv, den, *h.args(q3.dtype), A0, KV0,
                                                   dA_after, dKV_after, SA, SKV, T, D, h.S, ctx.span, n_chunks, items,
                                                   n_ranges, beta, eps, *_strides(q3), *_strides(do3), PAPER=paper,
                                                   C=CHUNK, **h.meta(vprec, "causal_dkv_kernel"))
        else:
            q3, k3, v3, A, Z = ctx.saved_tensors
            dq, dk, dv = (torch.empty_like(q3) for _ in range(3))
            span, n_ranges = _ranges(T, N, q3.device, TILE)
            dA = torch.empty(N, n_ranges, h.S, device=q3.device, dtype=torch.float32)
            dZ = torch.empty(N, n_ranges, h.S, D, device=q3.device, dtype=torch.float32)
            kernels.dq_kernel[(n_ranges, N)](q3, do3, dq, *h.args(q3.dtype), A, Z, dA, dZ, T, D, h.S, span, beta, eps,
                                             *_strides(q3), *_strides(do3), *_strides(dq), PAPER=paper,
                                             **h.meta(vprec, "dq_kernel"))
            dA, dZ = dA.sum(1), dZ.sum(1)
            if paper:
                dKV = dZ
            else:  # Z = KV / (A + eps)
                a_eps = (A + eps).unsqueeze(-1)
                dA, dKV = -(dZ * Z).sum(-1) / a_eps.squeeze(-1), dZ / a_eps
            meta = h.meta(vprec, "dkv_kernel")
            span, n_ranges = _tiles(T, N, q3.device, meta)
            kernels.dkv_kernel[(n_ranges, N)](k3, v3, dk, dv, *h.args(k3.dtype), dA, dKV, T, D, h.S, span, beta,
                                              *_strides(k3), *_strides(v3), *_strides(dk), **meta)
        shape = (B, H, T, D)
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None, None, None


def race_fused_step(state, q, k, v, planes, *, beta, paper, eps):
    """One decoded token through decode_step_kernel, one launch for every head: q, k, v [B, H, 1, D]; the state
    (generate.RaceState, fp32 and contiguous) updated in place; the output [B, H, 1, D] in q's dtype."""
    B, H, _, D = q.shape
    q2, k2, v2 = (x.reshape(B * H, D) for x in (q, k, v))  # views for a sweep's or a model's token
    o = torch.empty(B * H, D, device=q.device, dtype=q.dtype)
    h = _hash_for(planes, D, q.device)
    kernels.decode_step_kernel[(B * H,)](q2, k2, v2, o, *h.args(q.dtype), state.A, state.KV, D, h.S, beta, eps,
                                         *q2.stride(), *k2.stride(), *v2.stride(), *o.stride(), PAPER=paper,
                                         **h.meta(_vprec(q.dtype), "decode_step_kernel"))
    return o.view(B, H, 1, D)
