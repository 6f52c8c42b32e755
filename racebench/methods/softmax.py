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


def _kv_cache(k, v, cfg: BuildConfig, dim: int) -> dict:
    """The prompt's K, V ([B, H, T, D]) in a cache preallocated for the prompt and the tokens to decode, with the
    token axis at `dim`: 2 ([B, H, capacity, D], SDPA's layout) or 1 ([B, capacity, H, D], flash-attn's)."""
    if dim == 1:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    T = k.shape[dim]
    shape = list(k.shape)
    shape[dim] = max(T, cfg.T) + cfg.decode_tokens
    cache = {"K": k.new_empty(shape), "V": v.new_empty(shape), "t": T, "dim": dim}
    cache["K"].narrow(dim, 0, T).copy_(k)
    cache["V"].narrow(dim, 0, T).copy_(v)
    return cache


def _make_room(cache: dict) -> None:
    """Room for one more token: a full cache doubles, as a serving cache would."""
    import torch

    dim = cache["dim"]
    if cache["t"] == cache["K"].shape[dim]:
        for name in ("K", "V"):
            cache[name] = torch.cat([cache[name], torch.empty_like(cache[name])], dim=dim)


def _cache_bytes(cache: dict) -> int:
    """What the context fills: K and V of every token so far."""
    K = cache["K"]
    return 2 * K.numel() // K.shape[cache["dim"]] * cache["t"] * K.element_size()


def _cache_decoder(cfg: BuildConfig, backend: str | None = None) -> Decoder:
    """Softmax attention served from a K, V cache preallocated for the prompt and the tokens to decode (grown by
    doubling past that): the prefill is SDPA's causal attention over the prompt, each step SDPA of one query over
    the cache so far; restricted to one SDPA backend (a torch.nn.attention.SDPBackend name) when given."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(*args, **kwargs):
        with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
            return F.scaled_dot_product_attention(*args, **kwargs)

    def prefill(q, k, v):
        return sdpa(q, k, v, is_causal=True), _kv_cache(k, v, cfg, dim=2)

    def step(cache, q, k, v):
        _make_room(cache)
        t = cache["t"]
        cache["K"][:, :, t:t + 1], cache["V"][:, :, t:t + 1] = k, v
        cache["t"] = t + 1
        return sdpa(q, cache["K"][:, :, :t + 1], cache["V"][:, :, :t + 1])

    return Decoder(prefill, step, _cache_bytes)


def _kvcache_decoder(cfg: BuildConfig, module: str = "flash_attn") -> Decoder:
    """FlashAttention's own inference path (flash-attn's `flash_attn` or FA3's `flash_attn_interface`): the prefill
    is its flash_attn_func over the prompt, each step its flash_attn_with_kvcache, which writes the token's k, v
    into a [B, capacity, H, D] cache at position cache_seqlens in place and attends over the cache up to it."""
    import importlib

    fa = importlib.import_module(module)

    def first(o):  # some releases also return the log-sum-exp
        return o[0] if isinstance(o, tuple) else o

    def prefill(q, k, v):
        o = first(fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True))
        return o.transpose(1, 2), _kv_cache(k, v, cfg, dim=1)

    def step(cache, q, k, v):
        _make_room(cache)
        t = cache["t"]
        o = first(fa.flash_attn_with_kvcache(q.transpose(1, 2), cache["K"], cache["V"], k=k.transpose(1, 2),
                                             v=v.transpose(1, 2), cache_seqlens=t, causal=True))
        cache["t"] = t + 1
        return o.transpose(1, 2)

    return Decoder(prefill, step, _cache_bytes)


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
