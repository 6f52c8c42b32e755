"""RACE as written in RACE.md, in plain autograd: the float64 specification every fast path is tested
against. The causal branch materializes [.., T, S, D] prefix sums, so keep it to short sequences."""

from __future__ import annotations

from racebench.methods.race.hashing import soft_hash


def race_naive(q, k, v, planes, *, beta, causal=False, normalize="paper", eps=1e-6):
    fq, fk = soft_hash(q, planes, beta), soft_hash(k, planes, beta)  # [B, H, T, S]
    if causal:
        A = fk.cumsum(-2)  # [B, H, T, S]: sum over j <= t
        KV = (fk.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(-3)  # [B, H, T, S, D]
    else:
        A = fk.sum(-2, keepdim=True)  # [B, H, 1, S]
        KV = (fk.transpose(-1, -2) @ v).unsqueeze(-3)  # [B, H, 1, S, D]
    if normalize == "paper":
        num = (fq.unsqueeze(-1) * KV).sum(-2)
        return num / ((fq * A).sum(-1, keepdim=True) + eps)
    if normalize == "bucket":
        return (fq.unsqueeze(-1) * KV / (A.unsqueeze(-1) + eps)).sum(-2)
    raise ValueError(f"normalize must be 'paper' or 'bucket', not {normalize!r}")
