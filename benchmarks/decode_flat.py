"""Whether a method's decode step is flat in the context length: its step after prompts of each length, side by side
in one process, in turns of BLOCK consecutive tokens per length, so that the machine's slow and fast spells (on this
project's 2-core VM the same step takes about 20 or about 40 us for seconds at a time) hit every length alike; a
sweep measures each length at its own time. The sweep's protocol otherwise: the method's Decoder, the prompt's
prefill without autograd, each token's q, k, v sliced out in advance, the device synchronized before each clock
reading on CUDA. B=1, H=4, D=128, median over --tokens.

    python benchmarks/decode_flat.py [--method race] [--lengths 2^12,2^20] [--tokens 2000] [--device cpu]
        [--dtype fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from racebench.bench.units import parse_lengths
from racebench.errors import UsageError
from racebench.methods.registry import BuildConfig, get_method, torch_dtype

BLOCK = 50


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="race")
    parser.add_argument("--lengths", default="2^12,2^20")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16", "fp64"))
    a = parser.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    try:
        lengths, method = parse_lengths(a.lengths), get_method(a.method)
    except UsageError as exc:
        parser.error(str(exc))
    if method.decode is None:
        parser.error(f"--method {a.method} has no decode form")
    G, (B, H, D) = a.tokens, (1, 4, 128)
    runs = {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for T in lengths:
            cfg = BuildConfig(B, H, T, D, a.dtype, a.device, True, 0, {}, mode="decode", decode_tokens=G)
            decoder = method.decode(cfg)
            q, k, v = (torch.randn(B, H, T + G, D, generator=gen).to(a.device, torch_dtype(a.dtype)) for _ in range(3))
            _, state = decoder.prefill(q[..., :T, :], k[..., :T, :], v[..., :T, :])
            tokens = [tuple(x[..., t:t + 1, :] for x in (q, k, v)) for t in range(T, T + G)]
            runs[T] = (decoder, state, tokens, [])
        for start in range(0, G, BLOCK):  # each length in turn, a block of consecutive tokens at a time
            for decoder, state, tokens, times in runs.values():
                for token in tokens[start:start + BLOCK]:
                    sync()
                    t0 = time.perf_counter()
                    decoder.step(state, *token)
                    sync()
                    times.append((time.perf_counter() - t0) * 1e6)
    first = statistics.median(runs[lengths[0]][3])
    print(f"{a.method}, {a.device}, {a.dtype}, B={B}, H={H}, D={D}, {G} tokens per length\n")
    print(f"| T | median us per token | against T = {lengths[0]:,} | state bytes |\n|---|---|---|---|")
    for T, (decoder, state, _, times) in runs.items():
        median = statistics.median(times)
        print(f"| {T:,} | {median:.1f} | {median / first:.2f}x | {decoder.state_bytes(state):,} |")


if __name__ == "__main__":
    main()
