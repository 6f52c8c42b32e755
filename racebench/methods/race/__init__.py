"""RACE attention: the `race`, `race-torch` and `race-paper` methods, and the public functional API
(race_attention, make_planes, soft_hash: imported on first use, so that the records load without torch)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os

from racebench.methods.race import implementations
from racebench.methods.registry import ALL, HAS_TRITON, BuildConfig, Decoder, Knob, Method, register_method

log = logging.getLogger("racebench")

DEFAULT_P = 3
DEFAULT_L = 3
# Inverse temperature of the soft hash. See docs/choosing-beta.md: at 8 the soft hash is within a few percent of
# the hard SimHash on unnormalized inputs, so `race` estimates angular attention with gamma = P.
DEFAULT_BETA = 8.0
NORMALIZATIONS = ("paper", "bucket")

_LAZY = {"race_attention": "functional", "race_generate": "generate", "make_planes": "hashing", "soft_hash": "hashing"}
__all__ = ["race_attention", "race_generate", "make_planes", "soft_hash", "DEFAULT_BETA", "DEFAULT_P", "DEFAULT_L"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"racebench.methods.race.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def paper_beta(cfg: BuildConfig) -> float:
    """The published scripts' inverse temperature: 1 in the non-causal benchmark, 1/sqrt(D) in the causal model."""
    return 1.0 / math.sqrt(cfg.D) if cfg.causal else 1.0


P = Knob("race_P", int, DEFAULT_P, "RACE: hyperplanes (bits) per table; 2^P buckets.", min=1, max=12)
L = Knob("race_L", int, DEFAULT_L, "RACE: number of hash tables.", min=1, max=4096)
BETA = Knob("race_beta", float, DEFAULT_BETA, "RACE: the soft hash's inverse temperature.", min=1e-6, max=1e6)
M = Knob("race_M", int, 1, "RACE: independent ensembles of tables, averaged.", min=1, max=64)
NORMALIZE = Knob("race_normalize", str, "paper", "RACE: paper (Algorithm 1) or bucket (the published scripts).",
                 choices=NORMALIZATIONS)
RACE_KNOBS = (P, L, BETA, M, NORMALIZE)


def _angular_target(method: Method):
    """What race estimates (RACE.md): exact angular attention with gamma = P, as fidelity scores it."""

    def target(cfg: BuildConfig):
        from racebench.methods.angular import angular_attention

        gamma = float(method.effective_knobs(cfg)["race_P"])
        return (f"angular attention, gamma = {gamma:g}",
                lambda q, k, v: angular_attention(q, k, v, gamma=gamma, causal=cfg.causal))

    return target


def _planes(cfg: BuildConfig, knobs: dict):
    from racebench.methods.race.hashing import make_planes

    return make_planes(knobs["race_L"], knobs["race_P"], cfg.D, seed=cfg.seed, M=knobs["race_M"]).to(cfg.device)


def _build_race(cfg: BuildConfig, impl: str):
    from racebench.methods.race.functional import race_attention

    knobs = race.effective_knobs(cfg)
    planes = _planes(cfg, knobs)
    kw = dict(beta=knobs["race_beta"], causal=cfg.causal, normalize=knobs["race_normalize"], impl=impl)

    def attend(q, k, v):
        outs = [race_attention(q, k, v, planes[m], **kw) for m in range(knobs["race_M"])]
        return outs[0] if len(outs) == 1 else sum(outs) / len(outs)

    return attend


def _decoder(method: Method, impl: str | None):
    """The method's inference form (generate.py): one state per ensemble, their outputs averaged."""

    def build(cfg: BuildConfig) -> Decoder:
        from racebench.methods.race.generate import race_decode_step, race_prefill

        knobs = method.effective_knobs(cfg)
        planes = _planes(cfg, knobs)
        kw = dict(beta=knobs["race_beta"], normalize=knobs["race_normalize"])
        chosen = impl or _core_impl(dataclasses.replace(cfg, causal=True))  # the prefill's

        def prefill(q, k, v):
            parts = [race_prefill(q, k, v, p, impl=chosen, **kw) for p in planes]
            return sum(o for o, _ in parts) / len(parts), [s for _, s in parts]

        first = planes[0]  # indexing a tensor makes a view, microseconds each step

        def step(states, q, k, v):
            if len(states) == 1:  # a step is microseconds: no averaging of one ensemble
                return race_decode_step(states[0], q, k, v, first, **kw)
            return sum(race_decode_step(s, q, k, v, p, **kw) for s, p in zip(states, planes)) / len(planes)

        return Decoder(prefill, step, lambda states: sum(s.nbytes for s in states))

    return build


def _reference(method: Method):
    """The specification (naive.py) in float64, with the method's knobs and planes."""

    def build(cfg: BuildConfig):
        from racebench.methods.race.naive import race_naive

        knobs = method.effective_knobs(cfg)
        planes = _planes(cfg, knobs).double()
        kw = dict(beta=knobs["race_beta"], causal=cfg.causal, normalize=knobs["race_normalize"])
        return lambda q, k, v: sum(race_naive(q, k, v, p, **kw) for p in planes) / len(planes)

    return build


def _core_impl(cfg: BuildConfig) -> str:
    """What race_attention(impl="auto") runs for this config: the forward, backward and prefill."""
    knobs = race.effective_knobs(cfg)
    return implementations.choose(cfg.device, cfg.dtype_name, cfg.causal, cfg.D, knobs["race_L"], knobs["race_P"])[0]


def _impl(cfg: BuildConfig, impl: str | None = None) -> str:
    """What a point runs, recorded with it: the core (`impl`, else what "auto" runs), and in decode mode what the
    steps run."""
    impl = impl or _core_impl(cfg)
    if cfg.mode != "decode":
        return impl
    if impl == "triton":  # the steps (generate.py): the Triton decode kernel after the Triton prefill
        return impl + " + triton steps"
    native_ok = False
    if cfg.device == "cpu":  # the native decode_step where it runs
        from racebench.methods.race import native

        knobs = race.effective_knobs(cfg)
        acc = "fp64" if cfg.dtype_name == "fp64" else "fp32"
        native_ok = implementations.native_limits(acc, knobs["race_L"], knobs["race_P"]) is None and native.available()
    return impl + (" + cpp steps" if native_ok else " + torch steps")


def _limits(cfg: BuildConfig) -> str | None:
    """`race` is the device's kernels: on CUDA an input the Triton kernels cannot take is not silently given to
    the PyTorch core (race-torch runs it)."""
    knobs = race.effective_knobs(cfg)
    if cfg.device == "cuda" and HAS_TRITON and (why := implementations.triton_limits(
            cfg.dtype_name, cfg.D, knobs["race_L"], knobs["race_P"])):
        return f"{why}; race-torch runs it"
    return _sequence_parallel_limits(cfg)


def _sequence_parallel_limits(cfg: BuildConfig) -> str | None:
    if cfg.nproc > 1 and cfg.knob("race_M", 1) > 1:
        return "--nproc: sequence-parallel race runs one ensemble (race_M = 1)"
    return None


def _prepare(device: str) -> None:
    if device == "cpu":
        from racebench.methods.race import native

        # Built once, in the sweep's process, outside every point's budget; the points only import them.
        if not native.available():
            log.warning(f"race's native CPU kernels are unavailable ({native.build_error()}): race runs its PyTorch "
                        "core on the CPU (impl torch in the results)")


def _note(device: str) -> str | None:
    if device != "cpu":
        return None
    from racebench.methods.race import native

    state = native.state()
    return None if state == "built" else f"native CPU kernels {state}" + (
        "; the PyTorch core runs instead" if state.startswith("cannot") else "")


def _sequence_parallel(cfg: BuildConfig):
    """One rank's RACE over its shard of the sequence (parallel.py), and the bytes it has sent so far."""
    from racebench.methods.race import parallel

    knobs = race.effective_knobs(cfg)
    planes = _planes(cfg, knobs)[0]
    kw = dict(beta=knobs["race_beta"], causal=cfg.causal, normalize=knobs["race_normalize"])
    return (lambda q, k, v: parallel.race_attention_sp(q, k, v, planes, **kw)), lambda: parallel.bytes_communicated


def _environment() -> dict:
    from racebench.methods.race import launch, native

    # How race's Triton kernels are launched (the defaults, or RACEBENCH_KERNEL_CONFIG's file), and how its native
    # CPU kernels were built (compiler, flags, folder) or why they are not.
    return {"race_kernel_launch": launch.current(), "race_kernel_config_file": os.environ.get(launch.ENV),
            "race_cpu_kernels": native.build_info()}


race = register_method(Method(
    name="race",
    description="RACE attention: fused Triton kernels on CUDA, native kernels on CPU (non-causal), else the "
                "PyTorch core (race-torch)",
    build=lambda cfg: _build_race(cfg, _core_impl(cfg)),
    reference=lambda cfg: _reference(race)(cfg),
    knobs=RACE_KNOBS,
    # The kernels take fp32/bf16/fp16; on CUDA without Triton race is race-torch and takes every dtype.
    devices={"cpu": ALL, "cuda": implementations.TRITON_DTYPES if HAS_TRITON else ALL},
    limits=_limits,
    impl=_impl,
    prepare=_prepare,
    note=_note,
    sequence_parallel=_sequence_parallel,
    color="tab:blue",
    marker="o",
    family="race",
    presets=frozenset({"default", "paper", "quick", "ci", "fidelity", "fidelity-race", "fidelity-pareto"}),
    environment=_environment,
    decode=lambda cfg: _decoder(race, None)(cfg),
    estimates=lambda cfg: _angular_target(race)(cfg),
    sample_knob=L.name,
))
race_torch = register_method(Method(
    name="race-torch",
    description="RACE attention: soft-LSH features + blocked PyTorch linear-attention core, recomputing backward",
    build=lambda cfg: _build_race(cfg, "torch"),
    reference=lambda cfg: _reference(race_torch)(cfg),
    knobs=RACE_KNOBS,
    limits=_sequence_parallel_limits,
    impl=lambda cfg: _impl(cfg, "torch"),
    decode=lambda cfg: _decoder(race_torch, "torch")(cfg),
    color="tab:cyan",
    marker="d",
    family="race",
    estimates=lambda cfg: _angular_target(race_torch)(cfg),
    sample_knob=L.name,
))


def _build_race_paper(cfg: BuildConfig):
    from racebench.methods.race.paper import race_paper

    knobs = race_paper_method.effective_knobs(cfg)
    planes = _planes(cfg, knobs)
    return lambda q, k, v: race_paper(q, k, v, planes, beta=knobs["race_beta"], causal=cfg.causal)


race_paper_method = register_method(Method(
    name="race-paper",
    description="RACE as the published benchmark scripts compute it (bucket normalization, [T,S,D] causal)",
    build=_build_race_paper,
    reference=lambda cfg: _reference(race_paper_method)(cfg),
    knobs=(P, L, dataclasses.replace(BETA, default=paper_beta, default_help="1 non-causal, 1/sqrt(D) causal"), M,
           dataclasses.replace(NORMALIZE, choices=("bucket",), default="bucket")),
    color="tab:orange",
    marker="D",
    family="race",
    presets=frozenset({"default", "paper", "ci", "fidelity"}),
    estimates=lambda cfg: _angular_target(race_paper_method)(cfg),
    sample_knob=L.name,
))
