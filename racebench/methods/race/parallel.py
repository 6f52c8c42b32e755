"""Sequence-parallel RACE on torch.distributed: each rank holds a contiguous shard of the sequence.

RACE's state is tiny ([S, D] per head), so splitting the sequence costs a few small collectives per step,
independent of T (RACE.md; the lean core's per-head functions do all the local work):
- non-causal: local (A, KV) -> all-reduce -> local outputs; backward: local share of the state gradient ->
  all-reduce -> each rank finishes its own keys and values;
- causal: all-gather of the shard totals gives each rank the state entering its shard (exclusive prefix over
  ranks); backward: all-gather of the gradients of those entering states, and each rank adds the suffix over
  later ranks to its keys and values.
Shards may have different lengths; rank order is sequence order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from racebench.methods.race.lean import (
    causal_backward,
    causal_forward,
    key_backward,
    key_state,
    make_config,
    query_backward,
    query_forward,
)

# Payload bytes this process has sent through collectives (all-reduce: the tensor; all-gather: its share).
bytes_communicated = 0


def race_attention_sp(q, k, v, planes, *, beta, causal=False, normalize="paper", eps=1e-6, group=None,
                      block=None, chunk=None):
    """RACE attention of this rank's shard [B, H, T_rank, D] of a sequence split across the ranks of `group`;
    returns this shard's output. Equal to racebench.race_attention on the whole sequence, sliced."""
    return _SequenceParallelRace.apply(q, k, v, planes, float(beta), causal, normalize, eps, group, block, chunk)


def _all_reduce(t, group):
    global bytes_communicated
    bytes_communicated += t.numel() * t.element_size()
    dist.all_reduce(t, group=group)
    return t


def _exclusive_prefix_and_suffix(t, group):
    """All-gather one tensor per rank; returns (sum over lower ranks, sum over higher ranks)."""
    global bytes_communicated
    bytes_communicated += t.numel() * t.element_size()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    me = dist.get_rank(group)
    zero = torch.zeros_like(t)
    return sum(parts[:me], zero), sum(parts[me + 1 :], zero)


class _SequenceParallelRace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, planes, beta, causal, normalize, eps, group, block, chunk):
        B, H, T, D = q.shape
        cfg = make_config(q, planes, beta, normalize, eps, block, chunk)
        q3, k3, v3 = (x.reshape(B * H, T, D) for x in (q, k, v))
        o = torch.empty_like(q3)
        A, KV = (torch.stack(s) for s in zip(*[key_state(k3[n], v3[n], cfg) for n in range(B * H)]))
        if causal:
            (A_in, _), (KV_in, _) = (_exclusive_prefix_and_suffix(x, group) for x in (A, KV))
            states = [causal_forward(q3[n], k3[n], v3[n], o[n], cfg, A_in[n], KV_in[n]) for n in range(B * H)]
            A, KV = (torch.stack(s) for s in zip(*states))  # the state entering each block
        else:
            _all_reduce(A, group), _all_reduce(KV, group)
            for n in range(B * H):
                query_forward(q3[n], A[n], KV[n], o[n], cfg)
        ctx.save_for_backward(q, k, v, A, KV)
        ctx.cfg, ctx.causal, ctx.group = cfg, causal, group
        return o.view(B, H, T, D)

    @staticmethod
    def backward(ctx, do):
        q, k, v, A, KV = ctx.saved_tensors
        B, H, T, D = q.shape
        q3, k3, v3, do3 = (x.reshape(B * H, T, D) for x in (q, k, v, do))
        dq, dk, dv = (torch.empty_like(q3) for _ in range(3))
        cfg, N = ctx.cfg, B * H
        if ctx.causal:
            # Local backward; then every key also feeds the state entering each later shard.
            grads = [causal_backward(q3[n], k3[n], v3[n], do3[n], A[n], KV[n], dq[n], dk[n], dv[n], cfg)
                     for n in range(N)]
            dA_in, dKV_in = (torch.stack(s) for s in zip(*grads))
            (_, dA_later), (_, dKV_later) = (_exclusive_prefix_and_suffix(x, ctx.group) for x in (dA_in, dKV_in))
            for n in range(N):
                key_backward(k3[n], v3[n], dA_later[n], dKV_later[n], dk[n], dv[n], cfg, accumulate=True)
        else:
            shares = [query_backward(q3[n], do3[n], A[n], KV[n], dq[n], cfg) for n in range(N)]
            dA, dKV = (_all_reduce(torch.stack(s), ctx.group) for s in zip(*shares))
            for n in range(N):
                key_backward(k3[n], v3[n], dA[n], dKV[n], dk[n], dv[n], cfg)
        shape = (B, H, T, D)
        return dq.view(shape), dk.view(shape), dv.view(shape), *([None] * 8)
