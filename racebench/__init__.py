"""racebench: long-context attention benchmarks, RACE attention against FlashAttention and linear attention.

The public API. Names that need torch are imported on first use, so `import racebench` (and `racebench --help`)
does not pay for torch."""

from __future__ import annotations

import importlib

from racebench.version import __version__

# name -> the module that defines it
_API = {
    "RacebenchError": "racebench.errors",
    "BuildConfig": "racebench.methods.registry",
    "Knob": "racebench.methods.registry",
    "Method": "racebench.methods.registry",
    "build_method": "racebench.methods.registry",
    "get_method": "racebench.methods.registry",
    "list_methods": "racebench.methods.registry",
    "load_plugin": "racebench.methods.registry",
    "register_method": "racebench.methods.registry",
    "race_attention": "racebench.methods.race.functional",
    "race_generate": "racebench.methods.race.generate",
    "Decoder": "racebench.methods.registry",
    "make_planes": "racebench.methods.race.hashing",
    "soft_hash": "racebench.methods.race.hashing",
    "assert_matches_reference": "racebench.testing",
    "sweep": "racebench.api",
    "sweep_spec": "racebench.api",
    "load_run": "racebench.api",
    "plot": "racebench.api",
    "report": "racebench.api",
    "compare": "racebench.api",
    "environment": "racebench.api",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'racebench' has no attribute {name!r}")
