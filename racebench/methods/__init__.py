"""Attention methods: one module per family, each registering its methods' records in the registry."""

from racebench.methods.registry import (
    BuildConfig,
    Knob,
    Method,
    build_method,
    get_method,
    list_methods,
    load_plugin,
    register_method,
)

__all__ = ["BuildConfig", "Knob", "Method", "build_method", "get_method", "list_methods", "load_plugin",
           "register_method"]
