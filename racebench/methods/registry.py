"""The method registry: each attention method registered once, with what it supports."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from racebench.errors import UnavailableError, UnsupportedError, UsageError

HAS_CUDA = torch.cuda.is_available()
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAS_FLASH_ATTN3 = importlib.util.find_spec("flash_attn_interface") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ALL = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HALF = (torch.bfloat16, torch.float16)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BuildConfig:
    """Everything a method needs to build its attention function for one sweep point."""

    B: int
    H: int
    T: int
    D: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    causal: bool = False
    seed: int = 0
    knobs: dict[str, Any] = field(default_factory=dict)

    def knob(self, name: str, default: Any) -> Any:
        value = self.knobs.get(name)
        return default if value is None else value


@dataclass(frozen=True)
class Method:
    """One attention method: `build(config)` returns a function (q, k, v) -> o on [B, H, T, D]."""

    name: str
    description: str
    build: Callable[[BuildConfig], AttentionFn]
    causal: bool = True
    noncausal: bool = True
    # device -> the dtypes the method runs in there
    support: dict[str, tuple[torch.dtype, ...]] = field(default_factory=lambda: {"cpu": ALL, "cuda": ALL})
    # Returns None when the method can run here, else the reason it cannot ("needs CUDA").
    unavailable: Callable[[str], str | None] = lambda device: None
    # Which implementation a build with this config runs (recorded with every result).
    impl: Callable[[BuildConfig], str] = lambda cfg: "torch"
    # Work done once in the sweep's own process before the method's points (building native kernels), so
    # that no point's budget pays for it.
    prepare: Callable[[str], None] = lambda device: None
    knobs: tuple[str, ...] = ()
    # The knob values a build with this config really uses (defaults filled in), recorded with results.
    effective_knobs: Callable[[BuildConfig], dict[str, Any]] = lambda cfg: {}

    def availability(self, device: str | None = None) -> str | None:
        """None if the method can run on `device` (any of its devices when None), else why not."""
        devices = [device] if device else list(self.support)
        reasons = []
        for dev in devices:
            if dev not in self.support:
                reasons.append(f"{dev} not supported")
            elif dev == "cuda" and not HAS_CUDA:
                reasons.append("needs CUDA")
            elif (why := self.unavailable(dev)) is not None:
                reasons.append(why)
            else:
                return None
        return "; ".join(reasons)

    def check(self, device: str, dtype: torch.dtype, causal: bool) -> None:
        """Raise a clear error naming the combination when this method cannot run it."""
        combo = f"{self.name} on {device} in {DTYPE_NAMES.get(dtype, dtype)}, {'causal' if causal else 'non-causal'}"
        if device not in self.support:
            raise UnsupportedError(f"{combo}: {self.name} runs only on {', '.join(self.support)}")
        if dtype not in self.support[device]:
            names = ", ".join(DTYPE_NAMES[d] for d in self.support[device])
            raise UnsupportedError(f"{combo}: {self.name} supports only {names} on {device}")
        if causal and not self.causal:
            raise UnsupportedError(f"{combo}: {self.name} has no causal variant")
        if not causal and not self.noncausal:
            raise UnsupportedError(f"{combo}: {self.name} has only a causal variant")
        if (why := self.availability(device)) is not None:
            raise UnavailableError(f"{combo}: unavailable here ({why})")


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UsageError(f"unknown method {name!r}; known methods: {known}") from None


def list_methods() -> list[Method]:
    _load_builtin_methods()
    return list(_REGISTRY.values())


def build_method(name: str, config: BuildConfig) -> AttentionFn:
    """Validate the combination, then build the attention function (never a silent fallback)."""
    method = get_method(name)
    method.check(config.device, config.dtype, config.causal)
    return method.build(config)


def _load_builtin_methods() -> None:
    # Importing the modules registers their methods; done lazily to avoid import cycles.
    from racebench.methods import angular, linear, race, softmax  # noqa: F401
