"""The method registry: everything racebench knows of a method lives in its `Method` record.

The CLI's knob options, the spec's validation, the result columns, compare's matching keys and the views all read
these records; no other code names a method. Importing this module (and the built-in method modules) does not
import torch, so `racebench --help` and `racebench report` stay fast: torch is imported where a method is built.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import keyword
import math
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from racebench.errors import PluginError, UnavailableError, UnsupportedError, UsageError

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_FLASH_ATTN3 = importlib.util.find_spec("flash_attn_interface") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None

DEVICES = ("cpu", "cuda")
DECODE_MODES = ("prefill", "decode")  # inference: a method's Decoder runs them
DTYPES = ("fp32", "bf16", "fp16", "fp64")  # canonical names, as results record them
ALL = DTYPES
HALF = ("bf16", "fp16")
# What people write -> the canonical name.
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                 "fp16": "fp16", "float16": "fp16", "half": "fp16", "fp64": "fp64", "float64": "fp64",
                 "double": "fp64"}
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
ENTRY_POINT_GROUP = "racebench.methods"
# The headline figure: the fastest method of the first family against the fastest of the second, at each length.
HEADLINE_FAMILIES = ("race", "softmax")
# Set in a sweep's point processes: a method finds there what its `prepare` built in the sweep's process, and never
# compiles anything itself (the time would count against the point's budget).
NO_BUILD_ENV = "RACEBENCH_NO_BUILD"
# The order of sweeps and tables; any other module in racebench/methods/ is loaded after these, by name.
BUILTIN_ORDER = ("race", "softmax", "linear", "angular")


def dtype_name(dtype: Any) -> str:
    """'bf16', 'bfloat16' or torch.bfloat16 -> 'bf16'."""
    text = str(dtype).lower().removeprefix("torch.")
    if text not in DTYPE_ALIASES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[text]


def torch_dtype(dtype: Any):
    import torch

    return getattr(torch, _TORCH_NAMES[dtype_name(dtype)])


@functools.cache
def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Knob:
    """One setting of a method: a results column, a `--name-with-dashes` sweep option and a compare key.

    Methods that share a knob (race, race-torch and race-paper share race_P) declare the same name and type; each may
    give its own default (a value, or a function of the BuildConfig) and narrow the choices."""

    name: str  # e.g. race_P: the column; the option is --race-P
    type: type  # int, float or str
    default: Any  # a value, or Callable[[BuildConfig], value]
    help: str
    choices: tuple = ()
    min: float | None = None  # inclusive bounds
    max: float | None = None
    default_help: str | None = None  # how --help shows a default that is a function

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        if self.choices:
            return " | ".join(map(str, self.choices))
        show = (lambda x: str(int(x))) if self.type is int else (lambda x: f"{x:g}")
        if self.min is not None and self.max is not None:
            return f"{show(self.min)} to {show(self.max)}"
        if self.min is not None:
            return f">= {show(self.min)}"
        return "any " + self.type.__name__

    def describe_default(self) -> str:
        return self.default_help or str(self.default)

    def default_for(self, cfg: BuildConfig) -> Any:
        return self.default(cfg) if callable(self.default) else self.default

    def parse(self, value: Any) -> Any:
        """The value converted to the knob's type; a UsageError naming the option when it is not allowed."""
        try:
            v = self.type(value)
        except (TypeError, ValueError):
            raise UsageError(f"{self.option} takes {self.allowed()}, not {value!r}") from None
        if self.type is int and isinstance(value, float) and value != v:
            raise UsageError(f"{self.option} takes a whole number, not {value!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{self.option} takes a finite number, not {value!r}")
        if (self.choices and v not in self.choices) or (self.min is not None and v < self.min) or (
                self.max is not None and v > self.max):
            raise UsageError(f"{self.option} takes {self.allowed()}, not {value!r}")
        return v


@dataclass(frozen=True)
class BuildConfig:
    """The whole configuration of one point: what a method builds for, and what `supports` judges."""

    B: int
    H: int
    T: int
    D: int
    dtype: Any = "fp32"  # a name ('bf16') or a torch dtype
    device: str = "cpu"
    causal: bool = False
    seed: int = 0
    knobs: dict[str, Any] = field(default_factory=dict)
    nproc: int = 1  # ranks of a sequence-parallel point
    mode: str = "fwd+bwd"  # what a pass is: fwd, bwd, fwd+bwd, or the inference modes prefill and decode
    decode_tokens: int = 0  # tokens decoded after a prompt of T (a Decoder may preallocate for them)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    def knob(self, name: str, default: Any) -> Any:
        value = self.knobs.get(name)
        return default if value is None else value


AttentionFn = Callable[..., Any]  # (q, k, v) -> o, all [B, H, T, D] tensors


@dataclass(frozen=True)
class Decoder:
    """A method's inference form (causal): `prefill(q, k, v) -> (o, state)` over the prompt's [B, H, T, D] tensors
    returns its outputs and what decoding needs (race: its fixed-size state; softmax: the K, V cache);
    `step(state, q, k, v) -> o` takes one more token ([B, H, 1, D] each), updates the state in place and returns
    that token's output [B, H, 1, D]; `state_bytes(state)` is the memory the state holds now."""

    prefill: Callable[..., tuple[Any, Any]]
    step: Callable[..., Any]
    state_bytes: Callable[[Any], int]


def decode_all(decoder: Decoder, q, k, v, prompt_len: int):
    """Prefill on the first prompt_len tokens, then decode the rest one at a time: the outputs of every position,
    [B, H, T, D]; equal to the method's causal forward over the whole sequence."""
    import torch

    T = q.shape[-2]
    if not (isinstance(prompt_len, int) and 1 <= prompt_len <= T):
        raise UsageError(f"prompt_len must be a whole number between 1 and T = {T}, not {prompt_len!r}")
    with torch.no_grad():  # inference
        out, state = decoder.prefill(q[..., :prompt_len, :], k[..., :prompt_len, :], v[..., :prompt_len, :])
        steps = [decoder.step(state, q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :])
                 for t in range(prompt_len, T)]
        return torch.cat([out, *steps], dim=-2)
_never = lambda *args: None  # noqa: E731


@dataclass(frozen=True)
class Method:
    """One attention method. `build(config)` returns (q, k, v) -> o on [B, H, T, D]; `reference(config)` returns its
    definition, written plainly, built from the same random parameters: the tests run it in float64."""

    name: str
    description: str
    build: Callable[[BuildConfig], AttentionFn]
    reference: Callable[[BuildConfig], AttentionFn] | None = None
    knobs: tuple[Knob, ...] = ()
    # device -> the dtypes the method runs in there
    devices: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"cpu": ALL, "cuda": ALL})
    causal: bool = True
    noncausal: bool = True
    # Why the method cannot run a configuration it otherwise supports (a kernel's size limits), or None.
    limits: Callable[[BuildConfig], str | None] = _never
    # Why the method cannot run on this machine's `device` (a package not installed), or None.
    unavailable: Callable[[str], str | None] = _never
    # Which implementation a build with this config runs (recorded with every result).
    impl: Callable[[BuildConfig], str] = lambda cfg: "torch"
    # Work done once in the sweep's own process before the method's points (building native kernels), so that no
    # point's budget pays for it.
    prepare: Callable[[str], None] = _never
    # What a user should know of how the method runs on `device` here (its fast kernels cannot be built), or None.
    note: Callable[[str], str | None] = _never
    # A rank's part of a sequence-parallel point (--nproc): config of the rank's shard -> (the attention function of
    # the shard, a counter of the bytes this process has sent). None: the method runs in one process only.
    sequence_parallel: Callable[[BuildConfig], tuple[AttentionFn, Callable[[], int]]] | None = None
    baseline: bool = False  # the method speedups are measured against
    color: str | None = None  # fixed plot colour (any matplotlib colour)
    marker: str | None = None  # fixed plot marker (any matplotlib marker)
    # What it computes, for figures that compare kinds (the headline figure: HEADLINE_FAMILIES): 'softmax' for exact
    # softmax attention through any kernel, 'race', 'linear', ...
    family: str | None = None
    presets: frozenset[str] = frozenset()  # the presets whose method list it belongs to
    # What run.json records of this method's set-up (e.g. its kernels' launch options).
    environment: Callable[[], dict] | None = None
    # Its inference form (prefill, then one token at a time from a state; causal only), or None: no decode form.
    decode: Callable[[BuildConfig], Decoder] | None = None
    # The exact attention it estimates, beside softmax (race: angular attention with gamma = P), as (what it is, its
    # definition): `racebench fidelity` scores the method against it too. None: it approximates softmax only.
    estimates: Callable[[BuildConfig], tuple[str, AttentionFn]] | None = None
    # The knob counting its estimator's independent samples (race: the tables L): its error against `estimates`
    # should fall like knob^(-1/2), and fidelity's figure over it draws that law.
    sample_knob: str | None = None

    def availability(self, device: str | None = None) -> str | None:
        """None if the method can run on `device` (any of its devices when None), else why not."""
        reasons = []
        for dev in [device] if device else list(self.devices):
            if dev not in self.devices:
                reasons.append(f"{dev} not supported")
            elif dev == "cuda" and not has_cuda():
                reasons.append("needs CUDA")
            elif (why := self.unavailable(dev)) is not None:
                reasons.append(why)
            else:
                return None
        return "; ".join(reasons)

    def _problem(self, cfg: BuildConfig) -> tuple[type, str] | None:
        dtype = cfg.dtype_name
        combo = f"{self.name} on {cfg.device} in {dtype}, {'causal' if cfg.causal else 'non-causal'}"
        if cfg.device not in self.devices:
            return UnsupportedError, f"{combo}: {self.name} runs only on {', '.join(self.devices)}"
        if dtype not in self.devices[cfg.device]:
            return UnsupportedError, (f"{combo}: {self.name} supports only "
                                      f"{', '.join(self.devices[cfg.device])} on {cfg.device}")
        if cfg.causal and not self.causal:
            return UnsupportedError, f"{combo}: {self.name} has no causal variant"
        if not cfg.causal and not self.noncausal:
            return UnsupportedError, f"{combo}: {self.name} has only a causal variant"
        for knob in self.knobs:
            if cfg.knobs.get(knob.name) is not None:
                try:
                    knob.parse(cfg.knobs[knob.name])
                except UsageError as exc:
                    return UnsupportedError, f"{combo}: {self.name}: {exc}"
        if cfg.mode in DECODE_MODES and self.decode is None:
            return UnsupportedError, f"{combo}: {self.name} has no decode form (--mode {cfg.mode})"
        if cfg.nproc > 1 and self.sequence_parallel is None:
            return UnsupportedError, f"{combo}: {self.name} has no sequence-parallel form (--nproc)"
        if (why := self.limits(cfg)) is not None:
            return UnsupportedError, f"{combo}: {why}"
        if (why := self.availability(cfg.device)) is not None:
            return UnavailableError, f"{combo}: unavailable here ({why})"
        return None

    def supports(self, cfg: BuildConfig) -> str | None:
        """None when the method can run this configuration here, else the reason, naming the combination."""
        problem = self._problem(cfg)
        return None if problem is None else problem[1]

    def check(self, cfg: BuildConfig) -> None:
        """Raise UnsupportedError or UnavailableError with the reason when the method cannot run `cfg`."""
        if (problem := self._problem(cfg)) is not None:
            raise problem[0](problem[1])

    def effective_knobs(self, cfg: BuildConfig) -> dict[str, Any]:
        """The knob values a build with this config uses, defaults filled in: recorded with every result."""
        return {k.name: cfg.knob(k.name, k.default_for(cfg)) for k in self.knobs}


_REGISTRY: dict[str, Method] = {}
_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]*\Z")
_KNOB = re.compile(r"[a-z][a-z0-9]*_[A-Za-z0-9_]+\Z")  # prefixed, so no knob's option clashes with a sweep option


def register_method(method: Method) -> Method:
    """Add a method to the registry (built-in modules and plugins call this); refuses malformed records."""
    if not isinstance(method, Method):
        raise PluginError(f"register_method takes a racebench Method record, not {type(method).__name__}")
    if not _NAME.match(method.name):
        raise PluginError(f"method name {method.name!r}: use lowercase letters, digits, '-', '.', '+'")
    if method.name in _REGISTRY:
        raise PluginError(f"method {method.name!r} is registered twice")
    if not callable(method.build) or not (method.reference is None or callable(method.reference)):
        raise PluginError(f"method {method.name!r}: build and reference must be functions of a BuildConfig")
    for device, dtypes in method.devices.items():
        if device not in DEVICES or not set(dtypes) <= set(DTYPES):
            raise PluginError(f"method {method.name!r}: devices maps {', '.join(DEVICES)} to dtypes among "
                              f"{', '.join(DTYPES)}; got {device!r}: {dtypes!r}")
    known = all_knobs()
    for knob in method.knobs:
        if not isinstance(knob, Knob) or not _KNOB.match(knob.name) or keyword.iskeyword(knob.name):
            raise PluginError(f"method {method.name!r}: knobs are Knob records named prefix_name (e.g. race_P)")
        if knob.type not in (int, float, str):
            raise PluginError(f"method {method.name!r}: knob {knob.name} must be an int, float or str")
        if knob.name in known and known[knob.name].type is not knob.type:
            raise PluginError(f"method {method.name!r}: knob {knob.name} is a {known[knob.name].type.__name__} "
                              f"elsewhere, here a {knob.type.__name__}")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}") from None


def list_methods() -> list[Method]:
    _load_methods()
    return list(_REGISTRY.values())


def all_knobs() -> dict[str, Knob]:
    """Every knob name of the registered methods -> its first declaration (registration order)."""
    knobs: dict[str, Knob] = {}
    for m in _REGISTRY.values():
        for k in m.knobs:
            knobs.setdefault(k.name, k)
    return knobs


def knob_columns() -> list[str]:
    _load_methods()
    return list(all_knobs())


def baseline_method() -> str | None:
    """The method speedups are measured against (the first registered with baseline=True)."""
    return next((m.name for m in list_methods() if m.baseline), None)


def build_method(name: str, config: BuildConfig) -> AttentionFn:
    """Validate the combination, then build the attention function (never a silent fallback)."""
    method = get_method(name)
    method.check(config)
    return method.build(config)


_loaded: set[str] = set()


def load_plugin(path: str | Path) -> list[str]:
    """Run a plugin file that registers methods with register_method; returns their names. Loading the same file
    again does nothing (child processes load the sweep's plugins too)."""
    _load_methods()
    path = Path(path).expanduser().resolve()
    if str(path) in _loaded:
        return []
    if not path.is_file():
        raise PluginError(f"--plugin {path}: no such file")
    before = set(_REGISTRY)
    module_name = "racebench_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except PluginError as exc:
        raise PluginError(f"plugin {path}: {exc}") from None
    except Exception as exc:  # whatever the file raises: one line, no traceback
        raise PluginError(f"plugin {path} failed to load: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    _loaded.add(str(path))
    added = [name for name in _REGISTRY if name not in before]
    if not added:
        raise PluginError(f"plugin {path} registers no method (call racebench.register_method)")
    return added


def load_plugins(paths) -> None:
    for path in paths or ():
        load_plugin(path)


_builtins_loaded = False


def _home(method: Method) -> str:
    """The racebench.methods module (or package) that registered a method: where its build function lives."""
    parts = getattr(method.build, "__module__", "").split(".")
    return ".".join(parts[:3])


def builtin_modules(folder: Path = Path(__file__).parent) -> list[str]:
    """The method modules and packages in racebench/methods/: a new method is one file there, nothing else."""
    found = sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if m.name != "registry")
    return [m for m in BUILTIN_ORDER if m in found] + [m for m in found if m not in BUILTIN_ORDER]


def _load_methods() -> None:
    """Built-in methods, then those of installed packages (entry-point group racebench.methods), once."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    modules = builtin_modules()
    for module in modules:  # importing a module registers its methods
        importlib.import_module(f"racebench.methods.{module}")
    # In the modules' order, whichever was imported first (a direct import of racebench.methods.softmax registers
    # flash before race): presets, tables and figures list methods in this order.
    rank = {f"racebench.methods.{m}": i for i, m in enumerate(modules)}
    ordered = sorted(_REGISTRY.values(), key=lambda m: rank.get(_home(m), len(rank)))
    _REGISTRY.clear()
    _REGISTRY.update((m.name, m) for m in ordered)

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, Method):
                register_method(obj)
            elif callable(obj):
                obj()
        except Exception as exc:
            raise PluginError(f"plugin {ep.name} ({ep.value}, entry point {ENTRY_POINT_GROUP}) failed to load: "
                              f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
