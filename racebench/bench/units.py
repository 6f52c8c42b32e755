"""Parsing of the human units the CLI accepts: lengths (2^20, 1M, 64K), durations (90s, 5m), sizes (1GiB, 80%)."""

from __future__ import annotations

import re

from racebench.errors import UsageError

MAX_LENGTH = 2**40  # far beyond any machine; bounds what a typo (2^20000) can ask for
_LENGTH_SUFFIX = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}
_DURATION = {"ms": 1e-3, "s": 1, "m": 60, "min": 60, "h": 3600}
_SIZES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_length(text: str | int) -> int:
    """'2^20', '2**20', '1M' (= 2^20), '64K', '1048576' -> tokens; must be positive."""
    s = str(text).strip().lower().replace("_", "")
    if m := re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", s):
        base, exponent = int(m[1]), int(m[2])
        value = base**exponent if base <= 1 or exponent <= 64 else MAX_LENGTH + 1
    elif m := re.fullmatch(r"(\d{1,20}(?:\.\d+)?)\s*([kmg]?)", s):
        value = float(m[1]) * _LENGTH_SUFFIX[m[2]]
        if value != int(value):
            raise UsageError(f"length {text!r} is not a whole number of tokens")
        value = int(value)
    else:
        raise UsageError(f"cannot read length {text!r}: use e.g. 4096, 2^20, 64K or 1M")
    if value <= 0:
        raise UsageError(f"length {text!r} must be positive")
    if value > MAX_LENGTH:
        raise UsageError(f"length {text!r} is over 2^40 tokens")
    return value


def parse_lengths(text: str) -> list[int]:
    lengths = [parse_length(part) for part in str(text).split(",") if part.strip()]
    if not lengths:
        raise UsageError("--lengths needs at least one length")
    if any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise UsageError(f"--lengths must be strictly increasing, got {text!r}")
    return lengths


def geometric_lengths(lo: int, hi: int, growth: float) -> list[int]:
    if lo > hi:
        raise UsageError(f"--min-len ({lo}) is larger than --max-len ({hi})")
    if not growth > 1:
        raise UsageError(f"--growth must be greater than 1, got {growth}")
    out, x = [], float(lo)
    while round(x) <= hi:
        if not out or round(x) > out[-1]:
            out.append(round(x))
        x *= growth
    return out


def parse_duration(text: str | float) -> float:
    """'90s', '5m', '1.5h', '500ms', '30' (seconds) -> seconds."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?", s)
    if not m or float(m[1]) <= 0:
        raise UsageError(f"cannot read duration {text!r}: use e.g. 90s, 5m or 500ms")
    return float(m[1]) * _DURATION[m[2] or "s"]


def parse_bytes(text: str | int, *, total: int | None = None) -> int:
    """'1GiB', '512MB', '2g', '80%' (of `total`) -> bytes."""
    s = str(text).strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", s):
        if total is None:
            raise UsageError(f"{text!r}: a percentage needs a known total")
        frac = float(m[1]) / 100
        if not 0 < frac <= 1:
            raise UsageError(f"memory budget {text!r} must be between 0% and 100%")
        return int(frac * total)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", s)
    if not m or m[2] not in _SIZES or float(m[1]) <= 0:
        raise UsageError(f"cannot read size {text!r}: use e.g. 512MB, 1GiB or 80%")
    return int(float(m[1]) * _SIZES[m[2]])


def parse_growth(text: str, *, option: str) -> float:
    """A tolerated growth: '10%' or '1.1x' -> 0.1 (any size, 150% included)."""
    s = str(text).strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", s):
        return float(m[1]) / 100
    if (m := re.fullmatch(r"(\d+(?:\.\d+)?)x", s)) and float(m[1]) >= 1:
        return float(m[1]) - 1
    raise UsageError(f"{option} takes a percentage or a factor of at least 1, e.g. 10% or 1.1x; not {text!r}")


def format_bytes(n: float | None) -> str:
    if n is None or n != n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_length(T: float | None) -> str:
    if T is None or T != T:  # None or NaN
        return "-"
    T = int(T)
    if T & (T - 1) == 0:
        return f"2^{T.bit_length() - 1}"
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if size <= T:
            return f"{T / size:.3g}{unit}"
    return str(T)


def format_ms(ms: float | None) -> str:
    if ms is None or ms != ms:
        return "-"
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1000:.3g} s"
