"""Attention methods: one module per family, each registering its variants in the registry."""

from racebench.methods.registry import (
    HAS_CUDA,
    HAS_FLASH_ATTN,
    HAS_TRITON,
    BuildConfig,
    Method,
    build_method,
    get_method,
    list_methods,
    register_method,
)

__all__ = ["HAS_CUDA", "HAS_FLASH_ATTN", "HAS_TRITON", "BuildConfig", "Method", "build_method",
           "get_method", "list_methods", "register_method"]
