"""RACE at the memory floor: a blocked linear-attention core under the soft-hash feature map.

RACE.md ("The key to a fast, lean implementation"): both normalizations are linear attention with
S = L * 2**P features, so the state is [S, D] per head. This module never forms [T, S, D]:
- the sequence is processed in blocks of BLOCK tokens, so every temporary is O(block * (S + D));
- non-causal: one pass over keys builds A [S] and KV [S, D], one pass over queries reads them;
- causal: inside a block, chunks of CHUNK tokens are exact (masked C x C scores) and chunk states are
  prefix-summed; the state entering each block is kept (tiny) for the backward, which walks blocks in
  reverse and carries the suffix sums of the state gradients;
- the backward recomputes phi from q and k instead of saving it; all accumulation is fp32 (fp64 for fp64
  inputs), whatever the input dtype.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from racebench.methods.race.hashing import soft_hash, soft_hash_vjp

BLOCK = 16384
CHUNK = 64


def race_lean(q, k, v, planes, *, beta, causal=False, normalize="paper", eps=1e-6, block=None, chunk=None):
    """RACE attention on [B, H, T, D] tensors; planes [L, P, D]. See racebench.race_attention."""
    return _RaceFunction.apply(q, k, v, planes, float(beta), causal, normalize, eps,
                               int(block or BLOCK), int(chunk or CHUNK))


class _RaceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, planes, beta, causal, normalize, eps, block, chunk):
        B, H, T, D = q.shape
        q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))  # views for contiguous inputs
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        cfg = SimpleNamespace(planes=planes.to(q.device, acc), beta=beta, normalize=normalize, eps=eps,
                              block=block, chunk=chunk, acc=acc)
        if causal:
            o, A, KV = _causal_forward(q3, k3, v3, cfg)
        else:
            o, A, KV = _noncausal_forward(q3, k3, v3, cfg)
        ctx.save_for_backward(q, k, v, A, KV)
        ctx.cfg, ctx.causal = cfg, causal
        return o.view(B, H, T, D)

    @staticmethod
    def backward(ctx, do):
        q, k, v, A, KV = ctx.saved_tensors
        B, H, T, D = q.shape
        q3, k3, v3, do3 = (x.reshape(B * H, T, D) for x in (q, k, v, do))
        backward = _causal_backward if ctx.causal else _noncausal_backward
        dq, dk, dv = backward(q3, k3, v3, do3, A, KV, ctx.cfg)
        shape = (B, H, T, D)
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None, None, None, None, None


def _blocks(T, block):
    return [(s, min(s + block, T)) for s in range(0, T, block)]


def _phi(x, cfg):
    return soft_hash(x.to(cfg.acc), cfg.planes, cfg.beta)


def _vjp(x, grad, cfg):
    return soft_hash_vjp(x, cfg.planes, cfg.beta, grad)


# ----------------------------------------------------------------------------- non-causal


def _noncausal_forward(q, k, v, cfg):
    N, T, D = q.shape
    S = cfg.planes.shape[0] * 2 ** cfg.planes.shape[1]
    A = q.new_zeros(N, S, dtype=cfg.acc)
    KV = q.new_zeros(N, S, D, dtype=cfg.acc)
    for s, e in _blocks(T, cfg.block):
        fk = _phi(k[:, s:e], cfg)  # [N, b, S]
        A += fk.sum(1)
        KV.baddbmm_(fk.transpose(1, 2), v[:, s:e].to(cfg.acc))
    Z = KV / (A + cfg.eps).unsqueeze(-1) if cfg.normalize == "bucket" else KV
    o = torch.empty_like(q)
    for s, e in _blocks(T, cfg.block):
        fq = _phi(q[:, s:e], cfg)
        out = fq @ Z  # [N, b, D]
        if cfg.normalize == "paper":
            out /= fq @ A.unsqueeze(-1) + cfg.eps
        o[:, s:e] = out
    return o, A, KV


def _noncausal_backward(q, k, v, do, A, KV, cfg):
    N, T, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dKV, dA = torch.zeros_like(KV), torch.zeros_like(A)
    if cfg.normalize == "bucket":
        a_eps = (A + cfg.eps).unsqueeze(-1)  # [N, S, 1]
        Z = KV / a_eps
    for s, e in _blocks(T, cfg.block):  # queries: dq, and the gradient of the state (A, KV)
        fq, g = _phi(q[:, s:e], cfg), do[:, s:e].to(cfg.acc)
        if cfg.normalize == "paper":
            den = fq @ A.unsqueeze(-1) + cfg.eps  # [N, b, 1]
            G = g @ KV.transpose(1, 2)  # [N, b, S]
            w = (fq * G).sum(-1, keepdim=True) / (den * den)
            dfq = G / den - w * A.unsqueeze(1)
            dKV.baddbmm_((fq / den).transpose(1, 2), g)
            dA -= (w * fq).sum(1)
        else:
            dfq = g @ Z.transpose(1, 2)
            dKV.baddbmm_(fq.transpose(1, 2), g)  # the gradient of Z until the loop ends
        dq[:, s:e] = _vjp(q[:, s:e], dfq, cfg)
    if cfg.normalize == "bucket":
        dA = -(dKV * Z).sum(-1) / a_eps.squeeze(-1)
        dKV = dKV / a_eps
    for s, e in _blocks(T, cfg.block):  # keys and values
        fk, vb = _phi(k[:, s:e], cfg), v[:, s:e].to(cfg.acc)
        dv[:, s:e] = fk @ dKV
        dk[:, s:e] = _vjp(k[:, s:e], vb @ dKV.transpose(1, 2) + dA.unsqueeze(1), cfg)
    return dq, dk, dv


# ----------------------------------------------------------------------------- causal


def _chunked(x, C):
    """[N, b, F] -> [N, n, C, F], zero-padded to whole chunks (zero features contribute nothing)."""
    N, b, F_ = x.shape
    n = -(-b // C)
    return F.pad(x, (0, 0, 0, n * C - b)).view(N, n, C, F_)


def _exclusive_cumsum(x, dim):
    cs = x.cumsum(dim)
    return torch.cat((torch.zeros_like(cs.narrow(dim, 0, 1)), cs.narrow(dim, 0, x.shape[dim] - 1)), dim)


def _reverse_exclusive_cumsum(x, dim):
    return _exclusive_cumsum(x.flip(dim), dim).flip(dim)


def _causal_block(q, k, v, A_in, KV_in, cfg):
    """Forward math of one block (recomputed by the backward). A_in [N, S], KV_in [N, S, D]: the sums
    over all earlier blocks."""
    C = cfg.chunk
    fq, fk, vv = _chunked(_phi(q, cfg), C), _chunked(_phi(k, cfg), C), _chunked(v.to(cfg.acc), C)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= t inside a chunk
    chunk_kv = fk.transpose(-1, -2) @ vv  # [N, n, S, D]
    KV0 = KV_in.unsqueeze(1) + _exclusive_cumsum(chunk_kv, 1)  # state entering each chunk
    r = SimpleNamespace(fq=fq, fk=fk, vv=vv, mask=mask, KV0=KV0,
                        A_out=A_in + fk.sum((1, 2)), KV_out=KV_in + chunk_kv.sum(1))
    if cfg.normalize == "paper":
        r.A0 = A_in.unsqueeze(1) + _exclusive_cumsum(fk.sum(2), 1)  # [N, n, S]
        r.scores = (fq @ fk.transpose(-1, -2)) * mask  # [N, n, C, C]
        r.den = (fq * r.A0.unsqueeze(2)).sum(-1, keepdim=True) + r.scores.sum(-1, keepdim=True) + cfg.eps
        r.o = (fq @ KV0 + r.scores @ vv) / r.den
    else:
        N, n, C_, S = fk.shape
        r.a_eps = (A_in.view(N, 1, S) + fk.view(N, n * C, S).cumsum(1)).view_as(fk) + cfg.eps  # A_t + eps
        r.qf = fq / r.a_eps
        r.scores = (r.qf @ fk.transpose(-1, -2)) * mask
        r.o = r.qf @ KV0 + r.scores @ vv
    return r


def _causal_forward(q, k, v, cfg):
    N, T, D = q.shape
    S = cfg.planes.shape[0] * 2 ** cfg.planes.shape[1]
    blocks = _blocks(T, cfg.block)
    As = q.new_zeros(len(blocks), N, S, dtype=cfg.acc)  # state entering each block, for the backward
    KVs = q.new_zeros(len(blocks), N, S, D, dtype=cfg.acc)
    o = torch.empty_like(q)
    for i, (s, e) in enumerate(blocks):
        r = _causal_block(q[:, s:e], k[:, s:e], v[:, s:e], As[i], KVs[i], cfg)
        o[:, s:e] = r.o.flatten(1, 2)[:, : e - s]
        if i + 1 < len(blocks):
            As[i + 1], KVs[i + 1] = r.A_out, r.KV_out
    return o, As, KVs


def _causal_backward(q, k, v, do, As, KVs, cfg):
    N, T, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dKV_later = torch.zeros_like(KVs[0])  # gradient of the state from all later blocks
    dA_later = torch.zeros_like(As[0])
    for i, (s, e) in reversed(list(enumerate(_blocks(T, cfg.block)))):
        b = e - s
        r = _causal_block(q[:, s:e], k[:, s:e], v[:, s:e], As[i], KVs[i], cfg)
        g = _chunked(do[:, s:e].to(cfg.acc), cfg.chunk)
        fq, fk, vv = r.fq, r.fk, r.vv
        if cfg.normalize == "paper":
            dnum = g / r.den
            dden = -(dnum * r.o).sum(-1, keepdim=True)  # [N, n, C, 1]
            dS = (dnum @ vv.transpose(-1, -2) + dden) * r.mask
            dfq = dnum @ r.KV0.transpose(-1, -2) + dden * r.A0.unsqueeze(2) + dS @ fk
            dfk = dS.transpose(-1, -2) @ fq
            dvv = r.scores.transpose(-1, -2) @ dnum
            dKV0 = fq.transpose(-1, -2) @ dnum  # [N, n, S, D]: gradient of each chunk's entering state
            dA0 = (fq * dden).sum(2)  # [N, n, S]
            # A key in chunk c feeds the entering state of every later chunk and block.
            dfk += (_reverse_exclusive_cumsum(dA0, 1) + dA_later.unsqueeze(1)).unsqueeze(2)
            dA_later = dA_later + dA0.sum(1)
        else:
            dS = (g @ vv.transpose(-1, -2)) * r.mask
            dqf = g @ r.KV0.transpose(-1, -2) + dS @ fk
            dfk = dS.transpose(-1, -2) @ r.qf
            dvv = r.scores.transpose(-1, -2) @ g
            dKV0 = r.qf.transpose(-1, -2) @ g
            dfq = dqf / r.a_eps
            dA = (-(dqf * r.qf) / r.a_eps).flatten(1, 2)  # [N, n*C, S]: gradient of A_t
            # A_t sums the keys j <= t, so key j collects the gradient of every A_t with t >= j.
            suffix = dA.flip(1).cumsum(1).flip(1) + dA_later.unsqueeze(1)
            dfk += suffix.view_as(fk)
            dA_later = dA_later + dA.sum(1)
        later_kv = _reverse_exclusive_cumsum(dKV0, 1) + dKV_later.unsqueeze(1)  # [N, n, S, D]
        dfk += vv @ later_kv.transpose(-1, -2)
        dvv += fk @ later_kv
        dKV_later = dKV_later + dKV0.sum(1)
        dq[:, s:e] = _vjp(q[:, s:e], dfq.flatten(1, 2)[:, :b], cfg)
        dk[:, s:e] = _vjp(k[:, s:e], dfk.flatten(1, 2)[:, :b], cfg)
        dv[:, s:e] = dvv.flatten(1, 2)[:, :b]
    return dq, dk, dv
