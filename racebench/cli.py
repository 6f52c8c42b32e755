"""The racebench command line: thin Typer commands over the library."""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from racebench.errors import RacebenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmarks for long-context attention: RACE against FlashAttention and linear attention.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Benchmarks for long-context attention: RACE against FlashAttention and linear attention."""


def user_errors(fn):
    """Turn a RacebenchError into one readable line and its exit code: no traceback for user mistakes."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RacebenchError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
    return wrapper


@app.command()
@user_errors
def methods() -> None:
    """List the attention methods, what they support, and whether each can run on this machine."""
    from racebench.views.tables import methods_table

    console.print(methods_table())

