"""SweepSpec: every option of a sweep, parsed and validated once, frozen, stored in run.json."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from racebench.bench.units import geometric_lengths, parse_bytes, parse_duration, parse_length, parse_lengths
from racebench.errors import UsageError
from racebench.methods.registry import (
    DECODE_MODES,
    DTYPE_ALIASES,
    BuildConfig,
    dtype_name,
    get_method,
    has_cuda,
    list_methods,
    load_plugins,
    torch_dtype,
)

# Seconds a point's process gets beyond the time budget to start and to hand its result back.
GRACE_S = 15.0
MODES = ("fwd", "bwd", "fwd+bwd", *DECODE_MODES)  # prefill, decode: inference from a method's Decoder

# Each preset fills the options the user left out; its methods are those whose record names the preset's tag.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: a CPU sweep that finishes within about five minutes on 2 cores.
    "default": dict(tag="default", min_len="2^10", max_len="2^18", warmup=1, repeats=3, time_budget="20s"),
    # The published protocol (RACE.md): B=1, H=4, D=128, non-causal fwd+bwd, 2 warm-up + 5 timed passes.
    "paper-gpu": dict(tag="paper", device="cuda", dtype="bf16", min_len="2^11", max_len="2^28", causal=False,
                      mode="fwd+bwd", time_budget="5m"),
    "paper-cpu": dict(tag="paper", device="cpu", dtype="fp32", min_len="2^11", max_len="2^26", causal=False,
                      mode="fwd+bwd", time_budget="10m"),
    "quick": dict(tag="quick", min_len="2^8", max_len="2^12", warmup=1, repeats=3, time_budget="30s"),
    # Regression gates on CI runners: lengths above a device's fixed cost per pass, enough repeats for compare's
    # statistics, a few minutes in all (docs/regression-gate.md).
    # Each point in several rounds, a process each: processes of the same code differ by more than one
    # process's passes do, so compare's samples are the rounds.
    "ci-cpu": dict(tag="ci", device="cpu", dtype="fp32", min_len="2^10", max_len="2^12", warmup=2, repeats=3,
                   rounds=8, time_budget="60s"),
    "ci-gpu": dict(tag="ci", device="cuda", dtype="bf16", min_len="2^16", max_len="2^20", warmup=3, repeats=10,
                   rounds=5, time_budget="60s"),
}


def preset_methods(preset: str) -> tuple[str, ...]:
    """The methods a preset runs: those whose record lists the preset's tag, in registry order."""
    tag = PRESETS[preset]["tag"]
    return tuple(m.name for m in list_methods() if tag in m.presets)


@dataclass(frozen=True)
class SweepSpec:
    methods: tuple[str, ...]
    lengths: tuple[int, ...]
    B: int = 1
    H: int = 4
    D: int = 128
    dtype: str = "fp32"
    device: str = "cpu"
    causal: bool = False
    mode: str = "fwd+bwd"
    warmup: int = 2
    repeats: int = 5
    rounds: int = 1  # processes per completed point: the sweep, then rounds - 1 passes over its completed points
    time_budget_s: float = 60.0
    memory_budget_bytes: int = 2**30
    refine: float | None = None
    seed: int = 0
    knobs: dict[str, Any] = field(default_factory=dict)
    preset: str = "default"
    nproc: int = 1  # ranks of a sequence-parallel point, each with its own memory budget
    decode_tokens: int = 64  # --mode decode: tokens decoded one at a time after a prompt of T
    cuda_graphs: bool = False  # each pass replayed from a CUDA graph captured once (bench/graphs.py)
    plugins: tuple[str, ...] = ()  # files of users' methods, loaded by every process of the sweep

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    @property
    def passes(self) -> int:
        """Passes a point runs, for predicting whether the next length fits the time budget. A decode point's one
        timed pass holds its samples (one per token): first, memory, warm-up and timed passes."""
        if self.mode == "decode":
            return 3 + max(self.warmup - 1, 1)
        return self.warmup + self.repeats + 1

    def tokens(self, T: int) -> int:
        """Tokens of a point's inputs: T, and the tokens decoded after them in decode mode."""
        return T + (self.decode_tokens if self.mode == "decode" else 0)

    def input_bytes(self, T: int) -> int:
        """q, k, v: what every point allocates before the method runs."""
        return 3 * self.B * self.H * self.tokens(T) * self.D * self.torch_dtype.itemsize

    def floor_bytes(self, T: int) -> int:
        """The protocol's memory floor: q, k, v, o (and dq, dk, dv when training) must exist (DESIGN.md)."""
        n = {"fwd": 4, "bwd": 7, "fwd+bwd": 7, "prefill": 4, "decode": 4}[self.mode]
        return n * self.B * self.H * self.tokens(T) * self.D * self.torch_dtype.itemsize

    def build_config(self, T: int) -> BuildConfig:
        return BuildConfig(self.B, self.H, T, self.D, self.dtype, self.device, self.causal, self.seed, self.knobs,
                           self.nproc, self.mode, self.decode_tokens if self.mode == "decode" else 0)

    def unsupported_reason(self, method: str) -> str | None:
        """Why `method` cannot run in this sweep, or None (the method record's `supports`). Asked by the runner
        before it starts a child, and by the child itself, so that no caller measures a combination the method
        would get wrong."""
        return get_method(method).supports(self.build_config(self.lengths[0]))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["methods"], d["lengths"] = tuple(d["methods"]), tuple(d["lengths"])
        d["plugins"] = tuple(d.get("plugins", ()))
        load_plugins(d["plugins"])  # a resumed sweep, a child process: the user's methods first
        return cls(**d)


def _positive_int(name: str, value: Any) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be a whole number, got {value!r}") from None
    if v <= 0:
        raise UsageError(f"--{name} must be positive, got {v}")
    return v


def _count(name: str, value: Any, minimum: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} must be a whole number, got {value!r}") from None
    if v < minimum:
        raise UsageError(f"--{name} must be at least {minimum}, got {v}")
    return v


def load_plugin_files(plugins) -> tuple[str, ...]:
    """Load the users' method files given (--plugin); their resolved paths, as run.json keeps them."""
    paths = tuple(str(Path(p).expanduser().resolve()) for p in plugins or ())
    load_plugins(paths)
    return paths


def choose_preset(presets: dict[str, dict], preset: str | None, what: str = "") -> tuple[str, dict]:
    """(name, options) of a command's preset (default: "default"); an unknown name is a UsageError listing them."""
    name = preset or "default"
    if name not in presets:
        raise UsageError(f"unknown {what + ' ' if what else ''}preset {name!r}; presets: {', '.join(presets)}")
    return name, presets[name]


def parse_methods(text: str) -> tuple[str, ...]:
    """--methods: comma-separated names of registered methods, none twice."""
    names = tuple(m.strip() for m in str(text).split(",") if m.strip())
    if not names:
        raise UsageError("--methods names no method")
    for m in names:
        get_method(m)  # raises with the list of known methods
    if len(set(names)) != len(names):
        raise UsageError("--methods lists a method twice")
    return names


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if has_cuda() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not has_cuda():
        raise UsageError("--device cuda: no CUDA device is available on this machine")
    return device


def _device_memory(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    return psutil.virtual_memory().total


def default_memory_budget(device: str) -> int:
    if device == "cuda":
        return int(0.9 * _device_memory(device))
    # A safe share of what is free now: the rest of the machine keeps working, the OOM killer stays asleep.
    return int(0.6 * psutil.virtual_memory().available)


def validate_knobs(knobs: dict[str, Any], methods: tuple[str, ...]) -> dict[str, Any]:
    """The knobs given (None = not given), each converted and checked against the records of the sweep's methods
    that have it: a value no such method takes, or a knob none of them has, is a UsageError. A value only some of
    them take leaves the others `unsupported`, with the reason (Method.supports)."""
    out = {}
    for name, value in knobs.items():
        if value is None:
            continue
        declared = [k for m in methods for k in get_method(m).knobs if k.name == name]
        option = "--" + name.replace("_", "-")
        if not declared:
            raise UsageError(f"{option}: no method of this sweep has the knob {name} (methods: {', '.join(methods)})")
        errors = []
        for knob in declared:
            try:
                out[name] = knob.parse(value)
                break
            except UsageError as exc:
                errors.append(str(exc))
        else:
            raise UsageError(errors[0])
    return out


def graphs_refusal(spec: SweepSpec) -> str | None:
    """Why a sweep cannot replay its passes from CUDA graphs, or None."""
    if spec.device != "cuda":
        return "replays passes on a GPU; this sweep runs on the CPU"
    if spec.mode not in ("fwd", "fwd+bwd"):
        return f"captures fwd or fwd+bwd passes, not --mode {spec.mode}"
    if spec.nproc > 1:
        return "runs one process per point, not --nproc"
    return None


def build_spec(*, preset: str | None = None, methods: str | None = None, lengths: str | None = None,
               min_len: str | None = None, max_len: str | None = None, growth: float | None = None,
               batch: int | None = None, heads: int | None = None, head_dim: int | None = None,
               dtype: str | None = None, device: str | None = None, causal: bool | None = None,
               mode: str | None = None, warmup: int | None = None, repeats: int | None = None,
               rounds: int | None = None, time_budget: str | None = None, memory_budget: str | None = None,
               refine: float | None = None, seed: int | None = None, knobs: dict[str, Any] | None = None,
               nproc: int | None = None, plugins: list[str] | tuple[str, ...] | None = None,
               oversubscribe: bool = False, decode_tokens: int | None = None,
               cuda_graphs: bool | None = None) -> SweepSpec:
    """Options as the CLI gives them (None = not given) -> a validated SweepSpec. `oversubscribe` lets --nproc
    exceed the usable cores."""
    given = {k: v for k, v in locals().items()
             if k not in ("preset", "knobs", "plugins", "oversubscribe") and v is not None}
    plugin_paths = load_plugin_files(plugins)
    name, chosen = choose_preset(PRESETS, preset)
    opts = chosen | given

    device = resolve_device(opts.get("device", "auto"))
    text = opts.get("dtype") or ("bf16" if device == "cuda" else "fp32")
    if str(text).lower() not in DTYPE_ALIASES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPE_ALIASES)}, not {text!r}")
    dtype = dtype_name(text)
    if device == "cuda" and dtype == "bf16":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise UsageError("--dtype bf16: this GPU cannot run bfloat16")

    method_names = parse_methods(opts["methods"]) if "methods" in opts else preset_methods(name)
    knobs = validate_knobs(knobs or {}, method_names)

    if "lengths" in opts:
        lens = parse_lengths(opts["lengths"])
    else:
        lens = geometric_lengths(parse_length(opts.get("min_len", "2^10")), parse_length(opts.get("max_len", "2^20")),
                                 float(opts.get("growth", 2)))
    mode = opts.get("mode", "fwd+bwd")
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    refine_prec = opts.get("refine")
    if refine_prec is not None and not 0 < float(refine_prec) < 1:
        raise UsageError(f"--refine is a relative precision between 0 and 1 (e.g. 0.05), not {refine_prec}")

    total = _device_memory(device)
    budget = (parse_bytes(opts["memory_budget"], total=total) if "memory_budget" in opts
              else default_memory_budget(device))
    spec = SweepSpec(
        methods=method_names, lengths=tuple(lens),
        B=_positive_int("batch", opts.get("batch", 1)), H=_positive_int("heads", opts.get("heads", 4)),
        D=_positive_int("head-dim", opts.get("head_dim", 128)), dtype=dtype, device=device,
        causal=bool(opts.get("causal", mode in DECODE_MODES)), mode=mode,
        decode_tokens=_positive_int("decode-tokens", opts.get("decode_tokens", 64)),
        warmup=_count("warmup", opts.get("warmup", 2), 0), repeats=_positive_int("repeats", opts.get("repeats", 5)),
        rounds=_positive_int("rounds", opts.get("rounds", 1)),
        time_budget_s=parse_duration(opts.get("time_budget", "60s")), memory_budget_bytes=budget,
        refine=float(refine_prec) if refine_prec is not None else None, seed=int(opts.get("seed", 0)),
        knobs=knobs, preset=name,
        nproc=_positive_int("nproc", opts.get("nproc", 1)), plugins=plugin_paths,
        cuda_graphs=bool(opts.get("cuda_graphs", False)),
    )
    if spec.nproc > usable_cores() and not oversubscribe:
        raise UsageError(f"--nproc {spec.nproc}: racebench may use {usable_cores()} cores here, and more processes "
                         "than cores measure their contention, not the method (--oversubscribe runs it anyway)")
    if spec.mode in DECODE_MODES and not spec.causal:
        raise UsageError(f"--mode {spec.mode} is causal inference: leave out --non-causal")
    if "decode_tokens" in given and spec.mode != "decode":
        raise UsageError("--decode-tokens applies to --mode decode")
    if spec.nproc > 1 and spec.mode != "fwd+bwd":
        raise UsageError("--nproc measures fwd+bwd steps only")
    if spec.cuda_graphs and (why := graphs_refusal(spec)):
        raise UsageError(f"--cuda-graphs {why}")
    need = spec.input_bytes(-(-spec.lengths[0] // spec.nproc))  # what one rank holds
    if need > budget:
        raise UsageError(f"--memory-budget {budget} bytes cannot hold even the inputs q, k, v at "
                         f"T = {spec.lengths[0]} ({need} bytes{' per rank' if spec.nproc > 1 else ''})")
    return spec


# The spec field each sweep option sets (--resume compares what it is given against the run's).
_OPTION_FIELDS = dict(preset="preset", methods="methods", lengths="lengths", min_len="lengths", max_len="lengths",
                      growth="lengths", batch="B", heads="H", head_dim="D", dtype="dtype", device="device",
                      causal="causal", mode="mode", warmup="warmup", repeats="repeats", rounds="rounds",
                      time_budget="time_budget_s",
                      memory_budget="memory_budget_bytes", refine="refine", seed="seed", nproc="nproc",
                      plugins="plugins", decode_tokens="decode_tokens", cuda_graphs="cuda_graphs")


def resume_differences(stored: SweepSpec, options: dict[str, Any]) -> list[str]:
    """The options given with --resume (None = not given; knobs under "knobs") that ask for something other than
    the run records, each as '--option value (the run: value)'. Options equal to the run's are fine: the command
    that started a run, with --resume added, continues it."""
    knobs = {k: v for k, v in (options.get("knobs") or {}).items() if v is not None}
    given = {k: v for k, v in options.items() if k in _OPTION_FIELDS and v is not None}
    if not given and not knobs:
        return []
    base = dict(preset=stored.preset, device=stored.device, methods=",".join(stored.methods),
                plugins=list(stored.plugins))
    asked = build_spec(**(base | given), knobs=knobs, oversubscribe=True)
    differences = []
    for option, value in given.items():
        name = _OPTION_FIELDS[option]
        if getattr(asked, name) != getattr(stored, name):
            differences.append(f"--{option.replace('_', '-')} {value} (the run: {_show(getattr(stored, name))})")
    cfg = stored.build_config(stored.lengths[0])
    recorded = {}
    for m in stored.methods:
        recorded |= {k: v for k, v in get_method(m).effective_knobs(cfg).items() if k in knobs and k not in recorded}
    for name, value in asked.knobs.items():
        if name in knobs and recorded.get(name) != value:
            differences.append(f"--{name.replace('_', '-')} {knobs[name]} (the run: {_show(recorded.get(name))})")
    return differences


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if len(value) <= 6 else f"{value[0]},...,{value[-1]} ({len(value)} values)"
    return str(value)
