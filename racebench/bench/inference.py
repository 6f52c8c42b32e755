"""One inference point (--mode prefill | decode), measured with a method's Decoder in the protocol of a training
point (worker.measure): inputs before any clock; a first pass that checks the numbers; peak memory in a pass of its
own; warm-up; then the timed passes, synchronized on CUDA; every failure a status.

prefill: a pass is the causal prefill over the T prompt tokens; time_ms is its median over --repeats passes.
decode: a pass is the prefill, then --decode-tokens tokens decoded one at a time from the state, each timed on its
own (its q, k, v sliced out in advance, as a model hands them over); time_ms is the median time per token of the
timed pass (its tokens are the samples), prefill_ms that pass's prefill. state_bytes is what the state or cache
holds at the end (race: fixed; softmax: K, V of every token)."""

from __future__ import annotations

import time

import torch

from racebench.bench import memory
from racebench.bench.spec import SweepSpec
from racebench.bench.worker import early_timeout, failure, finite, verdict
from racebench.results.timing import timing_fields


def measure_inference(spec: SweepSpec, row: dict, T: int, build, start: float) -> dict:
    mem = memory.for_device(spec.device, spec.memory_budget_bytes)
    G = spec.decode_tokens if spec.mode == "decode" else 0
    try:
        mem.cap()
        before_inputs = mem.current()
        gen = torch.Generator(device=spec.device).manual_seed(spec.seed + T)
        q, k, v = (torch.randn(spec.B, spec.H, T + G, spec.D, generator=gen, device=spec.device,
                               dtype=spec.torch_dtype) for _ in range(3))
        # each token's q, k, v sliced out before any clock too: a slice costs microseconds, as much as race's whole
        # step on the CPU
        prompt = tuple(x[..., :T, :] for x in (q, k, v))
        tokens = [tuple(x[..., t:t + 1, :] for x in (q, k, v)) for t in range(T, T + G)]
        decoder = build()
        mem.sync()
        with_inputs = mem.current()

        def run():
            """(prefill seconds, seconds of each decoded token, the outputs, the state)."""
            with torch.no_grad():
                mem.sync()
                t0 = time.perf_counter()
                out, state = decoder.prefill(*prompt)
                mem.sync()
                prefill, steps, last = time.perf_counter() - t0, [], None
                for token in tokens:
                    t0 = time.perf_counter()
                    last = decoder.step(state, *token)
                    mem.sync()
                    steps.append(time.perf_counter() - t0)
            return prefill, steps, (out, last), state

        prefill, steps, outs, state = run()  # the first pass also checks the numbers
        if not finite(*outs):
            return row | dict(status="nonfinite", error="output holds NaN or Inf")
        del outs, state
        first = prefill + sum(steps)
        warm = max(spec.warmup - 1, 1)
        late, timeout = early_timeout(spec, start, first, 1 + warm + (1 if G else spec.repeats))
        if late:
            return row | timeout

        mem.reset_peak()  # peak memory: a pass of its own
        _, _, outs, state = run()
        peak, state_bytes = mem.peak(), decoder.state_bytes(state)
        del outs, state

        mem.settle_for_timing()
        for _ in range(warm):
            run()
        if G:
            prefill, steps, _, _ = run()
            samples, tokens, prefill_ms = steps, spec.B, prefill * 1e3
        else:
            samples = [run()[0] for _ in range(spec.repeats)]
            tokens, prefill_ms = spec.B * T, None
    except Exception as exc:  # every failure is data
        return row | failure(exc)
    timing = timing_fields([t * 1e3 for t in samples], tokens)
    return row | timing | verdict(spec, start, peak - before_inputs) | dict(
        peak_mem_bytes=peak - before_inputs, peak_mem_over_inputs_bytes=peak - with_inputs, state_bytes=state_bytes,
        prefill_ms=prefill_ms if G else timing["time_ms"], pass_ms=first * 1e3)
