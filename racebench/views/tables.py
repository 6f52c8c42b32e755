"""Rich tables for the terminal."""

from __future__ import annotations

from rich.table import Table

from racebench.methods.registry import list_methods


def methods_table(device: str | None = None) -> Table:
    table = Table(title="racebench methods", title_justify="left")
    for col in ("method", "description", "causal", "devices", "available here"):
        table.add_column(col, overflow="fold")
    for m in list_methods():
        why = m.availability(device)
        table.add_row(m.name, m.description, "yes" if m.causal else "no", ", ".join(m.support),
                      "[green]yes[/]" if why is None else f"[red]no[/] ({why})")
    return table
