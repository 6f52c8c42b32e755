"""The racebench command line: thin Typer commands over the library."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from racebench.errors import RacebenchError, UsageError

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



@app.command()
@user_errors
def sweep(
    preset: Annotated[str | None, typer.Option(help="paper-gpu, paper-cpu, quick or ci: the options it fixes "
                                                  "apply where you give none.")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods, e.g. race,flash "
                                                   "(see `racebench methods`).")] = None,
    min_len: Annotated[str | None, typer.Option(help="Shortest context: 4096, 2^12, 4K.")] = None,
    max_len: Annotated[str | None, typer.Option(help="Longest context: 2^20, 1M, 1048576.")] = None,
    growth: Annotated[float | None, typer.Option(help="Factor between lengths (default 2).")] = None,
    lengths: Annotated[str | None, typer.Option(help="Explicit comma-separated lengths instead of "
                                                   "--min-len/--max-len.")] = None,
    batch: Annotated[int | None, typer.Option("--batch", "-B", help="Batch size B (default 1).")] = None,
    heads: Annotated[int | None, typer.Option("--heads", "-H", help="Heads H (default 4).")] = None,
    head_dim: Annotated[int | None, typer.Option("--head-dim", "-D", help="Head dimension D (default 128).")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16, fp16 or fp64 (default bf16 on CUDA, "
                                                 "fp32 on CPU).")] = None,
    causal: Annotated[bool | None, typer.Option("--causal/--non-causal", help="Causal masking "
                                                   "(default non-causal, as in the paper).")] = None,
    mode: Annotated[str | None, typer.Option(help="fwd, bwd or fwd+bwd (default, as in the paper).")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warm-up passes per point (default 2).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed passes per point (default 5).")] = None,
    time_budget: Annotated[str | None, typer.Option(help="Time allowed per point: 90s, 5m.")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="Memory allowed per point: 1GiB, 512MB, 80% "
                                                         "(default: 60% of free RAM; 90% of the GPU).")] = None,
    refine: Annotated[float | None, typer.Option(help="After a method's first OOM or time-out, bisect its "
                                                    "threshold to this relative precision, e.g. 0.05.")] = None,
    race_P: Annotated[int | None, typer.Option("--race-P", help="RACE: hyperplanes (bits) per table.")] = None,
    race_L: Annotated[int | None, typer.Option("--race-L", help="RACE: number of tables.")] = None,
    race_beta: Annotated[float | None, typer.Option("--race-beta", help="RACE: soft-hash inverse "
                                                       "temperature.")] = None,
    race_M: Annotated[int | None, typer.Option("--race-M", help="RACE: ensembles averaged.")] = None,
    race_normalize: Annotated[str | None, typer.Option("--race-normalize", help="RACE: paper or "
                                                          "bucket.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of inputs and random projections.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default results/<run-id>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out, skipping finished "
                                         "points.")] = False,
) -> None:
    """Run single forward+backward passes of each method at growing context lengths, each point in its own
    process, and record time, peak memory and the out-of-memory / time-out thresholds."""
    from racebench import api
    from racebench.bench.spec import build_spec
    from racebench.results.store import load_run
    from racebench.views.progress import sweep_progress
    from racebench.views.tables import thresholds_table

    if race_normalize is not None and race_normalize not in ("paper", "bucket"):
        raise UsageError(f"--race-normalize must be paper or bucket, not {race_normalize!r}")
    spec = None
    if not resume:
        knobs = dict(race_P=race_P, race_L=race_L, race_beta=race_beta, race_M=race_M,
                     race_normalize=race_normalize)
        for name in ("race_P", "race_L", "race_M"):
            if knobs[name] is not None and knobs[name] <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if race_beta is not None and race_beta <= 0:
            raise UsageError("--race-beta must be positive")
        spec = build_spec(preset=preset, methods=methods, lengths=lengths, min_len=min_len, max_len=max_len,
                          growth=growth, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device,
                          causal=causal, mode=mode, warmup=warmup, repeats=repeats, time_budget=time_budget,
                          memory_budget=memory_budget, refine=refine, seed=seed, knobs=knobs)
    out_dir = out or (None if spec is None else api.new_run_dir(spec))
    command = "racebench " + " ".join(sys.argv[1:])
    try:
        with sweep_progress(spec or _resumed_spec(out_dir), console) as progress:
            store = api.sweep(spec, out_dir, resume=resume, command=command, progress=progress)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished points are saved in {out_dir}; continue with "
                          f"`racebench sweep --resume --out {out_dir}`")
        raise typer.Exit(130) from None
    _, df = load_run(store.path)
    console.print(thresholds_table(df))
    console.print(f"results: {store.path}/results.csv  (run.json, points.jsonl beside it)")


def _resumed_spec(out):
    from racebench.bench.spec import SweepSpec
    from racebench.results.store import load_meta

    if out is None:
        raise UsageError("--resume needs --out: the folder of the run to continue")
    return SweepSpec.from_dict(load_meta(out)["spec"])


@app.command()
@user_errors
def env() -> None:
    """Print the environment that every run records in its run.json."""
    from racebench.bench.environment import collect_environment
    from racebench.views.tables import environment_table

    console.print(environment_table(collect_environment()))
