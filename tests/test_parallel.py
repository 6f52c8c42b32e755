"""Sequence-parallel RACE with gloo: 2 and 3 processes, uneven shards, equal to the single-process function."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from racebench import make_planes, race_attention
from racebench.methods.race.parallel import race_attention_sp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, inputs, bounds, kw, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q, k, v, g, planes = inputs
        s, e = bounds[rank], bounds[rank + 1]
        shard = [x[:, :, s:e].clone().requires_grad_() for x in (q, k, v)]
        o = race_attention_sp(*shard, planes, block=16, chunk=8, **kw)
        o.backward(g[:, :, s:e])
        torch.save([o.detach(), *(x.grad for x in shard)], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, bounds", [(2, [0, 37, 100]), (3, [0, 30, 75, 100])], ids=["2ranks", "3ranks"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("normalize", ["paper", "bucket"])
def test_sequence_parallel_equals_single_process(tmp_path, world, bounds, causal, normalize):
    T, D = bounds[-1], 24
    q, k, v, g = (torch.randn(2, 2, T, D, dtype=torch.float64) for _ in range(4))
    planes = make_planes(3, 2, D, seed=int(torch.randint(1000, (1,)))).double()
    kw = dict(beta=4.0, causal=causal, normalize=normalize)
    mp.spawn(_rank_main, args=(world, _free_port(), (q, k, v, g, planes), bounds, kw, str(tmp_path)),
             nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    got = [torch.cat([p[i] for p in parts], dim=2) for i in range(4)]
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    o = race_attention(*ref, planes, **kw)
    o.backward(g)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, [o.detach(), *(x.grad for x in ref)]):
        assert ((a - b).norm() / b.norm()).item() < 1e-12, name
