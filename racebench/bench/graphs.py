"""The --cuda-graphs protocol: a point's pass captured once in a CUDA graph and timed as replays, so the time is the
GPU's work without the host's launch overhead (what a training loop that captures its step would see). A method
whose pass cannot be captured (a host synchronization, a shape read back from the GPU) is recorded unsupported
with the reason; graph and eager points never mix (results column cuda_graphs, one of compare's keys)."""

from __future__ import annotations

import time

import torch

from racebench.bench import memory
from racebench.errors import UnsupportedError


def checksum(t) -> float:
    """sum |t|, in 4M-element pieces (no full-size temporary): the eager pass's and the replay's must agree."""
    return float(sum(piece.float().abs().sum() for piece in t.detach().reshape(-1).split(2**22)))


def capture(body, q, k, v, sync):
    """Capture body() (one pass, returning its output) in a CUDA graph after a warm-up run on a side stream, as
    torch.cuda.graphs asks (lazy initialization and workspaces outside the capture). The gradients of q, k, v are
    allocated from the graph's pool at capture and rewritten by every replay. Returns (a function running one
    timed replay -> (seconds, output), the output tensor the replays write)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            body()
        torch.cuda.current_stream().wait_stream(stream)
        q.grad = k.grad = v.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
    except Exception as exc:
        if memory.is_oom(exc):
            raise
        raise UnsupportedError(f"cannot be captured in a CUDA graph: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200]}") from exc

    def replay():
        sync()
        t0 = time.perf_counter()
        graph.replay()
        sync()
        return time.perf_counter() - t0, out

    return replay, out


def agrees(eager_sum: float, out) -> bool:
    """Whether a replay's output matches the eager pass's (sums of |o| within 1%: kernels may sum in another order)."""
    return abs(checksum(out) - eager_sum) <= 1e-2 * max(abs(eager_sum), 1e-30)
