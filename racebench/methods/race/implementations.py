"""Which implementation of RACE runs an input: the one chooser behind the `race` method and
race_attention(impl="auto"). Torch-free, so the registry can ask it without importing torch."""

from __future__ import annotations

from racebench.methods.registry import HAS_TRITON

TRITON_DTYPES = ("fp32", "bf16", "fp16")
MAX_FEATURES = 64  # 128 needs 232 KiB of shared memory in the causal kernels, over an H100's 227
MAX_D = 256
NATIVE_DTYPES = ("fp32", "fp64")


def triton_limits(dtype: str, D: int, L: int, P: int) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None."""
    if dtype not in TRITON_DTYPES:
        return f"the Triton kernels take fp32, bf16 or fp16, not {dtype}"
    if L * 2**P > MAX_FEATURES:
        return f"the Triton kernels take up to {MAX_FEATURES} features (L * 2**P), not {L * 2**P} (L={L}, P={P})"
    if D > MAX_D:
        return f"the Triton kernels take D <= {MAX_D}, not {D}"
    return None


def native_limits(dtype: str, L: int, P: int) -> str | None:
    """Why the native CPU kernels cannot take these inputs (not whether they build), or None."""
    if dtype in NATIVE_DTYPES and L * P <= 64 and L * 2**P <= 512 and P <= 9:
        return None
    return (f"the native kernels take fp32/fp64, L*P <= 64 and L*2**P <= 512 (P <= 9); got {dtype}, "
            f"L={L}, P={P}")


def choose(device: str, dtype: str, causal: bool, D: int, L: int, P: int) -> tuple[str, str | None]:
    """(the implementation 'auto' runs, why it is not the device's kernels or None).

    CUDA: the Triton kernels where they take the inputs, else the PyTorch core. CPU: the native kernels for
    non-causal inputs they take, where they build; causal inputs run the PyTorch core (the kernels are the
    non-causal core)."""
    if device == "cuda":
        if not HAS_TRITON:
            return "torch", "triton is not installed"
        why = triton_limits(dtype, D, L, P)
        return ("torch", why) if why else ("triton", None)
    if causal:
        return "torch", None
    if (why := native_limits(dtype, L, P)) is not None:
        return "torch", why
    from racebench.methods.race import native  # builds the kernels on first use

    why = native.build_error()
    return ("torch", why) if why else ("cpp", None)
