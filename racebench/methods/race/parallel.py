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

from racebench.methods.race.lean import race_lean

# Payload bytes this process has sent through collectives (all-reduce: the tensor; all-gather: its share).
bytes_communicated = 0


def race_attention_sp(q, k, v, planes, *, beta, causal=False, normalize="paper", eps=1e-6, group=None,
                      block=None, chunk=None):
    """RACE attention of this rank's shard [B, H, T_rank, D] of a sequence split across the ranks of `group`;
    returns this shard's output. Equal to racebench.race_attention on the whole sequence, sliced."""
    return race_lean(q, k, v, planes, beta=beta, causal=causal, normalize=normalize, eps=eps, block=block,
                     chunk=chunk, comm=_Collectives(group))


class _Collectives:
    """The two collectives the lean core needs to treat its input as one shard of a longer sequence."""

    def __init__(self, group):
        self.group = group

    def all_reduce(self, t):
        global bytes_communicated
        bytes_communicated += t.numel() * t.element_size()
        dist.all_reduce(t, group=self.group)
        return t

    def prefix_suffix(self, t):
        """All-gather one tensor per rank; returns (sum over lower ranks, sum over higher ranks)."""
        global bytes_communicated
        bytes_communicated += t.numel() * t.element_size()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        me = dist.get_rank(self.group)
        zero = torch.zeros_like(t)
        return sum(parts[:me], zero), sum(parts[me + 1 :], zero)
