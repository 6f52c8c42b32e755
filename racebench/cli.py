"""The racebench command line: thin Typer commands over the library."""

from __future__ import annotations

import functools
import signal
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
    warmup: Annotated[int | None, typer.Option(help="Warm-up passes per point (default 2; the sweep with no "
                                               "options uses 1).")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed passes per point (default 5; the sweep with no "
                                                "options uses 3).")] = None,
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
    nproc: Annotated[int | None, typer.Option(help="Run each point across this many local processes, the "
                                              "sequence split between them (race only; each process gets "
                                              "--memory-budget).")] = None,
) -> None:
    """Run single forward+backward passes of each method at growing context lengths, each point in its own
    process, and record time, peak memory and the out-of-memory / time-out thresholds."""
    from racebench import api
    from racebench.bench.spec import build_spec
    from racebench.results.store import load_run
    from racebench.views.progress import sweep_progress
    from racebench.views.tables import thresholds_table

    if resume:
        spec = api.resumed_spec(out)
    else:
        knobs = dict(race_P=race_P, race_L=race_L, race_beta=race_beta, race_M=race_M,
                     race_normalize=race_normalize)
        spec = build_spec(preset=preset, methods=methods, lengths=lengths, min_len=min_len, max_len=max_len,
                          growth=growth, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device,
                          causal=causal, mode=mode, warmup=warmup, repeats=repeats, time_budget=time_budget,
                          memory_budget=memory_budget, refine=refine, seed=seed, knobs=knobs, nproc=nproc)
    out_dir = out or api.new_run_dir(spec)
    command = "racebench " + " ".join(sys.argv[1:])
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill ends the sweep as cleanly as Ctrl-C
    try:
        with sweep_progress(spec, console) as progress:
            store = api.sweep(spec, out_dir, resume=resume, command=command, progress=progress)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished points are saved in {out_dir}; continue with "
                          f"`racebench sweep --resume --out {out_dir}`")
        raise typer.Exit(130) from None
    _, df = load_run(store.path)
    console.print(thresholds_table(df))
    console.print(f"results: {store.path}/results.csv  (run.json, points.jsonl beside it)")


@app.command()
@user_errors
def env() -> None:
    """Print the environment that every run records in its run.json."""
    from racebench.bench.environment import collect_environment
    from racebench.views.tables import environment_table

    console.print(environment_table(collect_environment()))


def _runs(runs: list[Path] | None) -> list[tuple[dict, object]]:
    from racebench import api
    from racebench.results.store import load_run

    return [load_run(p) for p in (runs or [api.latest_run()])]


@app.command()
@user_errors
def plot(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders (default: the latest run). Several "
                                                        "runs share one figure, told apart by device.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="png, svg or pdf.")] = "png",
    out: Annotated[Path | None, typer.Option(help="Folder for the figures (default plots/<run-id>).")] = None,
) -> None:
    """Draw time and peak memory against context length, the largest context per method and the speedup
    over flash."""
    from racebench.views.plots import FORMATS, save_figures

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    frames = _runs(runs)
    out = out or Path("plots") / "+".join(meta["run_id"] for meta, _ in frames)
    for path in save_figures(frames, out, fmt):
        console.print(f"wrote {path}")


@app.command()
@user_errors
def report(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the latest run).")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the report as markdown to this file.")] = None,
    at: Annotated[str | None, typer.Option(help="Comma-separated lengths to show time and memory at "
                                              "(default: flash's largest and the longest completed).")] = None,
) -> None:
    """Summarize a run: per method the largest length completed, the threshold and its cause, time, speedup
    over flash and peak memory against the floor; and the run's environment."""
    from rich.table import Table

    from racebench.bench.units import parse_lengths
    from racebench.views.report import default_lengths, summary_frame, to_markdown
    from racebench.views.tables import environment_table

    meta, df = _runs([run] if run else None)[0]
    lengths = parse_lengths(at) if at else default_lengths(df)
    if markdown:
        markdown.write_text(to_markdown(meta, df, lengths))
        console.print(f"wrote {markdown}")
        return
    summary = summary_frame(df, lengths)
    table = Table(title=f"racebench run {meta['run_id']}: {meta.get('command', '')}", title_justify="left")
    for col in summary.columns:
        table.add_column(str(col))
    for row in summary.itertuples(index=False):
        table.add_row(*map(str, row))
    console.print(table)
    console.print(environment_table(meta["environment"]))


@app.command()
@user_errors
def compare(
    baseline: Annotated[Path, typer.Argument(help="Run folder of the baseline.")],
    candidate: Annotated[Path, typer.Argument(help="Run folder of the candidate.")],
    max_slowdown: Annotated[str, typer.Option(help="Largest tolerated slowdown per point, e.g. 10%.")] = "10%",
    max_memory_growth: Annotated[str, typer.Option(help="Largest tolerated peak-memory growth, e.g. 5%.")] = "5%",
) -> None:
    """Gate a candidate run against a baseline: exit 1 when a matched point got slower or bigger beyond the
    limits, or a length that completed in the baseline now fails; else exit 0."""
    from rich.table import Table

    from racebench.bench.units import parse_bytes
    from racebench.results.compare import compare_runs
    from racebench.results.store import load_run

    limits = [parse_bytes(x, total=10**6) / 10**6 for x in (max_slowdown, max_memory_growth)]
    if not all(x.strip().endswith("%") for x in (max_slowdown, max_memory_growth)):
        raise UsageError("--max-slowdown and --max-memory-growth are percentages, e.g. 10%")
    (_, base), (_, cand) = load_run(baseline), load_run(candidate)
    table_df, failures = compare_runs(base, cand, max_slowdown=limits[0], max_memory_growth=limits[1])
    if table_df.empty:
        raise UsageError("the two runs share no point (method, knobs, shape, dtype, device and length)")
    table = Table(title=f"{candidate} against {baseline}", title_justify="left")
    for col in ("method", "T", "status", "time ratio", "memory ratio", "verdict"):
        table.add_column(col)
    for r in table_df.itertuples():
        style = "green" if r.verdict == "ok" else "red"
        table.add_row(r.method, str(r.T), f"{r.status_base} -> {r.status_cand}", f"{r.time_ratio:.2f}x",
                      f"{r.mem_ratio:.2f}x", f"[{style}]{r.verdict}[/]")
    console.print(table)
    if failures:
        for f in failures:
            err_console.print(f"[red]regression:[/] {f}", highlight=False)
        raise typer.Exit(1)
    console.print("[green]no regression[/]")
