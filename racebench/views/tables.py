"""Rich tables for the terminal."""

from __future__ import annotations

from rich.table import Table


def methods_table(methods, device: str | None = None) -> Table:
    """Method records: name, description, knobs with their defaults, causality, devices, availability here."""
    table = Table(title="racebench methods", title_justify="left")
    for col in ("method", "description", "knobs (default)", "masks", "devices", "available here"):
        table.add_column(col, overflow="fold")
    for m in methods:
        why = m.availability(device)
        notes = [n for d in ([device] if device else m.devices) if (n := m.note(d))]
        knobs = "\n".join(f"{k.option} ({k.describe_default()})" for k in m.knobs) or "-"
        masks = ", ".join(name for name, has in (("non-causal", m.noncausal), ("causal", m.causal)) if has)
        here = ("[green]yes[/]" + "".join(f" ({n})" for n in notes)) if why is None else f"[red]no[/] ({why})"
        table.add_row(m.name + (" (baseline)" if m.baseline else ""), m.description, knobs, masks,
                      ", ".join(m.devices), here)
    return table


def frame_table(df, title: str) -> Table:
    """A pandas frame as a rich table, every value as text."""
    table = Table(title=title, title_justify="left")
    for col in df.columns:
        table.add_column(str(col))
    for row in df.itertuples(index=False):
        table.add_row(*map(str, row))
    return table


def thresholds_table(df, title: str = "Largest context completed per method") -> Table:
    import pandas as pd

    from racebench.bench.units import format_bytes, format_length, format_ms
    from racebench.results.summary import thresholds

    table = Table(title=title, title_justify="left")
    for col in ("method", "device", "dtype", "largest T done", "time", "peak memory", "peak / floor",
                "threshold", "cause"):
        table.add_column(col)
    for r in thresholds(df).itertuples():
        ok = pd.notna(r.max_ok_T) and pd.notna(r.peak_mem_bytes)
        ratio = r.peak_mem_bytes / r.floor_bytes if ok and r.floor_bytes else None
        table.add_row(r.method, r.device, r.dtype, format_length(r.max_ok_T), format_ms(r.time_ms),
                      format_bytes(r.peak_mem_bytes), f"{ratio:.2f}x" if ratio else "-",
                      format_length(r.fail_T), r.cause if isinstance(r.cause, str) else "-")
    return table


def environment_table(env: dict) -> Table:
    table = Table(title="Environment", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in env.items():
        table.add_row(key, _env_value(value))
    return table


def _env_value(value, nested: bool = False) -> str:
    """A value as one cell: a mapping one entry a line (the kernels' launch options: kernel: BT=64, ...), None as
    '-'."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        if nested:
            return ", ".join(f"{k}={v}" for k, v in value.items())
        return "\n".join(f"{k}: {_env_value(v, nested=True)}" for k, v in value.items())
    return str(value)
