"""Softmax attention: FlashAttention (flash-attn or SDPA's flash backend), the other SDPA backends, and
an explicit T x T reference."""

from __future__ import annotations

import math

from racebench.methods.registry import (
    ALL,
    HALF,
    HAS_FLASH_ATTN,
    HAS_FLASH_ATTN3,
    BuildConfig,
    Decoder,
    Method,
    register_method,
)


def softmax_naive(q, k, v, *, causal=False):
    """Explicit scores [B, H, T, T]: the reference, and the method that runs out of memory first."""
    import torch

    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def _reference(cfg: BuildConfig):
    return lambda q, k, v: softmax_naive(q, k, v, causal=cfg.causal)


def _sdpa(backend: str):
    """A build function running SDPA restricted to one backend (a torch.nn.attention.SDPBackend name)."""

    def build(cfg: BuildConfig):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, backend)

        def attend(q, k, v):
            with sdpa_kernel(chosen):
                return F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)
        return attend
    return build


def _flash_attn_build(cfg: BuildConfig):
    if cfg.device == "cuda" and HAS_FLASH_ATTN:
        from flash_attn import flash_attn_func

        def fa2(q, k, v):  # flash-attn wants [B, T, H, D]
            o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=cfg.causal)
            return o.transpose(1, 2)
        return fa2
    return _sdpa("FLASH_ATTENTION")(cfg)


def _cache_decoder(cfg: BuildConfig, backend: str | None = None) -> Decoder:
    """Softmax attention served from a K, V cache preallocated for the prompt and the tokens to decode (grown by
    doubling past that): the prefill is SDPA's causal attention over the prompt, each step SDPA of one query over
    the cache so far; restricted to one SDPA backend (a torch.nn.attention.SDPBackend name) when given."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(*args, **kwargs):
        with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
            return F.scaled_dot_product_attention(*args, **kwargs)

    def prefill(q, k, v):
        B, H, T, D = k.shape
        capacity = max(T, cfg.T) + cfg.decode_tokens
        cache = {"K": k.new_empty(B, H, capacity, D), "V": v.new_empty(B, H, capacity, D), "t": T}
        cache["K"][:, :, :T], cache["V"][:, :, :T] = k, v
        return sdpa(q, k, v, is_causal=True), cache

    def step(cache, q, k, v):
        t = cache["t"]
        if t == cache["K"].shape[2]:  # full: double it, as a serving cache would
            for name in ("K", "V"):
                cache[name] = torch.cat([cache[name], torch.empty_like(cache[name])], dim=2)
        cache["K"][:, :, t:t + 1], cache["V"][:, :, t:t + 1] = k, v
        cache["t"] = t + 1
        return sdpa(q, cache["K"][:, :, :t + 1], cache["V"][:, :, :t + 1])

    def state_bytes(cache):  # what the context fills: K and V of every token so far
        K = cache["K"]
        return 2 * K.shape[0] * K.shape[1] * cache["t"] * K.shape[3] * K.element_size()

    return Decoder(prefill, step, state_bytes)


def _kvcache_decoder(cfg: BuildConfig, module: str = "flash_attn") -> Decoder:
    """FlashAttention's own inference path (flash-attn's `flash_attn` or FA3's `flash_attn_interface`): the prefill
    is its flash_attn_func over the prompt, each step its flash_attn_with_kvcache, which writes the token's k, v
    into a [B, capacity, H, D] cache at position cache_seqlens in place and attends over the cache up to it."""
    import importlib

    import torch

    fa = importlib.import_module(module)

    def first(o):  # some releases also return the log-sum-exp
        return o[0] if isinstance(o, tuple) else o

    def prefill(q, k, v):
        B, H, T, D = k.shape
        capacity = max(T, cfg.T) + cfg.decode_tokens
        cache = {"K": k.new_empty(B, capacity, H, D), "V": v.new_empty(B, capacity, H, D), "t": T}
        cache["K"][:, :T], cache["V"][:, :T] = k.transpose(1, 2), v.transpose(1, 2)
        o = first(fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True))
        return o.transpose(1, 2), cache

    def step(cache, q, k, v):
        t = cache["t"]
        if t == cache["K"].shape[1]:  # full: double it, as a serving cache would
            for name in ("K", "V"):
                cache[name] = torch.cat([cache[name], torch.empty_like(cache[name])], dim=1)
        o = first(fa.flash_attn_with_kvcache(q.transpose(1, 2), cache["K"], cache["V"], k=k.transpose(1, 2),
                                             v=v.transpose(1, 2), cache_seqlens=t, causal=True))
        cache["t"] = t + 1
        return o.transpose(1, 2)

    def state_bytes(cache):
        K = cache["K"]
        return 2 * K.shape[0] * cache["t"] * K.shape[2] * K.shape[3] * K.element_size()

    return Decoder(prefill, step, state_bytes)


def _flash_decoder(cfg: BuildConfig) -> Decoder:
    """flash-attn's kvcache path on CUDA when installed, else SDPA over a preallocated cache."""
    return _kvcache_decoder(cfg) if cfg.device == "cuda" and HAS_FLASH_ATTN else _cache_decoder(cfg)


def _flash_impl(cfg: BuildConfig) -> str:
    if cfg.device == "cuda" and HAS_FLASH_ATTN:
        return "flash_attn." + ("flash_attn_with_kvcache" if cfg.mode == "decode" else "flash_attn_func")
    return "sdpa" if cfg.mode == "decode" else "sdpa-flash"  # a decode step lets SDPA pick its backend


def _flash3_build(cfg: BuildConfig):
    from flash_attn_interface import flash_attn_func

    def fa3(q, k, v):
        o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=cfg.causal)
        o = o[0] if isinstance(o, tuple) else o  # some FA3 releases also return the log-sum-exp
        return o.transpose(1, 2)
    return fa3


def _flash3_unavailable(device):
    import torch

    if not HAS_FLASH_ATTN3:
        return "flash-attn 3 (flash_attn_interface) not installed"
    if torch.cuda.get_device_capability()[0] != 9:
        return "FA3 needs a Hopper GPU"
    return None


register_method(Method(
    name="flash",
    description="FlashAttention: flash-attn's flash_attn_func on CUDA when installed, else SDPA's flash backend",
    build=_flash_attn_build,
    reference=_reference,
    devices={"cpu": ALL, "cuda": HALF},
    impl=_flash_impl,
    baseline=True,
    decode=_flash_decoder,
    color="tab:green",
    marker="s",
    family="softmax",
    presets=frozenset({"default", "paper", "quick", "ci"}),
))
register_method(Method(
    name="flash3",
    description="FlashAttention-3 (flash_attn_interface) on Hopper GPUs",
    build=_flash3_build,
    reference=_reference,
    devices={"cuda": HALF},
    unavailable=_flash3_unavailable,
    impl=lambda cfg: "flash_attn_interface." + ("flash_attn_with_kvcache" if cfg.mode == "decode" else
                                                "flash_attn_func"),
    decode=lambda cfg: _kvcache_decoder(cfg, "flash_attn_interface"),
    color="darkgreen",
    marker="P",
    family="softmax",
))
# One SDPA backend each: (name, SDPBackend member, what it is, device -> dtypes, colour, marker).
_SDPA_ONLY = (
    ("sdpa-efficient", "EFFICIENT_ATTENTION", "memory-efficient", {"cuda": ALL}, "tab:olive", "^"),
    ("sdpa-cudnn", "CUDNN_ATTENTION", "cuDNN", {"cuda": HALF}, "yellowgreen", "v"),
    ("sdpa-math", "MATH", "math (unfused)", {"cpu": ALL, "cuda": ALL}, "tab:gray", "<"),
)
for _name, _backend, _what, _devices, _color, _marker in _SDPA_ONLY:
    register_method(Method(name=_name, description=f"PyTorch SDPA restricted to its {_what} backend",
                           build=_sdpa(_backend), reference=_reference, devices=_devices,
                           impl=lambda cfg, n=_name: n, color=_color, marker=_marker, family="softmax",
                           decode=lambda cfg, b=_backend: _cache_decoder(cfg, b)))
register_method(Method(
    name="softmax-naive",
    description="Softmax attention with explicit T x T scores (runs out of memory first)",
    build=_reference,
    reference=_reference,
    color="black",
    marker="x",
    family="softmax",
))
