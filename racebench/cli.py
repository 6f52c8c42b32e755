"""The racebench command line: thin Typer commands over racebench.api, rendered by racebench.views.

No torch at import: `racebench --help` and `racebench report` never load it. The sweep's knob options
(--race-P, --performer-features, ...) are generated from the method records, plugins' included."""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement

from racebench import api
from racebench.errors import RacebenchError, RunFailedError, UsageError
from racebench.version import __version__

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one message, one line: never wrapped
Plugins = Annotated[list[Path] | None, typer.Option(
    "--plugin", help="A Python file that registers methods with racebench.register_method; repeatable.")]


def show(table) -> None:
    """A table on standard output: on a terminal at its width; piped (a CI log), as wide as its content needs, so
    that no header is cut and no value split over lines."""
    if console.is_terminal:
        console.print(table)
        return
    width = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(width=max(width, 40), highlight=False).print(table)


def _command_line() -> str:
    """This process's command, shell-quoted, as run.json records it."""
    return shlex.join(["racebench", *sys.argv[1:]])


@contextlib.contextmanager
def interruptible(out_dir: Path, again: str | None = None):
    """Ctrl-C or a kill (SIGTERM) ends a long command cleanly: what finished is saved; says where, and how to go on."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(f"interrupted: what finished is saved in {out_dir}" + (f"; continue with `{again}`"
                                                                                  if again else ""))
        raise typer.Exit(130) from None


def user_errors(fn):
    """Turn a RacebenchError into one readable line and its exit code: no traceback for user mistakes."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RacebenchError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"racebench {__version__}")
        raise typer.Exit()


def methods(plugin: Plugins = None) -> None:
    """List the attention methods, their knobs, what they support, and whether each can run on this machine."""
    from racebench.views.tables import methods_table

    show(methods_table(api.methods(plugin)))


def sweep(
    preset: Annotated[str | None, typer.Option(metavar="|".join(api.PRESET_NAMES), help="The options it fixes apply "
                                               "where you give none. (default: default)")] = None,
    device: Annotated[str | None, typer.Option(metavar="auto|cpu|cuda", help="auto: CUDA when present. "
                                               "(default: auto)")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods, e.g. race,flash (see `racebench "
                                                "methods`). (default: the preset's)")] = None,
    min_len: Annotated[str | None, typer.Option(help="Shortest context: 4096, 2^12, 4K. (default: 2^10)")] = None,
    max_len: Annotated[str | None, typer.Option(help="Longest context: 2^20, 1M, 1048576. (default: 2^18)")] = None,
    growth: Annotated[float | None, typer.Option(help="Factor between lengths. (default: 2)")] = None,
    lengths: Annotated[str | None, typer.Option(help="Explicit comma-separated lengths instead of "
                                                "--min-len/--max-len.")] = None,
    batch: Annotated[int | None, typer.Option("--batch", "-B", help="Batch size B. (default: 1)")] = None,
    heads: Annotated[int | None, typer.Option("--heads", "-H", help="Heads H. (default: 4)")] = None,
    head_dim: Annotated[int | None, typer.Option("--head-dim", "-D", help="Head dimension D. (default: 128)")] = None,
    dtype: Annotated[str | None, typer.Option(metavar="|".join(api.DTYPES), help="Also float32, bfloat16, float16, "
                                              "float64. (default: bf16 on CUDA, fp32 on CPU)")] = None,
    causal: Annotated[bool | None, typer.Option("--causal/--non-causal", help="Causal masking. "
                                                "(default: non-causal, as in the paper)")] = None,
    mode: Annotated[str | None, typer.Option(metavar="|".join(api.MODES), help="What one timed pass is; prefill "
                                             "and decode are causal inference. "
                                             "(default: fwd+bwd, as in the paper)")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warm-up passes per point. (default: 2; the sweep with no "
                                               "options: 1)")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed passes per point. (default: 5; the sweep with no "
                                                "options: 3)")] = None,
    rounds: Annotated[int | None, typer.Option(help="Measure each completed point again in new processes until it "
                                               "has this many, spread over the run: a spread between processes "
                                               "for compare. (default: 1; ci presets: 8 on CPU, 5 on CUDA)")] = None,
    time_budget: Annotated[str | None, typer.Option(help="Time allowed per point: 90s, 5m. (default: 60s; the "
                                                    "sweep with no options: 20s)")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="Memory allowed per point: 1GiB, 512MB, 80%. (default: "
                                                      "60% of free RAM; 90% of the GPU)")] = None,
    refine: Annotated[float | None, typer.Option(help="After a method's first OOM or time-out, bisect its "
                                                 "threshold to this relative precision, e.g. 0.05.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of inputs and random projections. (default: 0)")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder. (default: results/<run-id>)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out, skipping finished "
                                         "points.")] = False,
    decode_tokens: Annotated[int | None, typer.Option(help="--mode decode: tokens decoded one at a time after the "
                                                      "prompt of T. (default: 64)")] = None,
    nproc: Annotated[int | None, typer.Option(help="Run each point across this many local processes, the "
                                              "sequence split between them (methods with a sequence-parallel "
                                              "form; each process gets --memory-budget). (default: 1)")] = None,
    oversubscribe: Annotated[bool, typer.Option(help="Let --nproc exceed the cores racebench may use.")] = False,
    cuda_graphs: Annotated[bool | None, typer.Option("--cuda-graphs/--eager", help="CUDA: capture each point's "
                                                     "pass in a CUDA graph once and time its replays (results "
                                                     "column cuda_graphs; compare never matches it with eager "
                                                     "points). (default: eager)")] = None,
    plugin: Plugins = None,
    **knobs,
) -> None:
    """Run single forward+backward passes of each method at growing context lengths, each point in its own
    process, and record time, peak memory and the out-of-memory / time-out thresholds."""
    from racebench.views.progress import sweep_progress
    from racebench.views.tables import thresholds_table

    options = dict(preset=preset, methods=methods, lengths=lengths, min_len=min_len, max_len=max_len, growth=growth,
                   batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device, causal=causal, mode=mode,
                   warmup=warmup, repeats=repeats, rounds=rounds, time_budget=time_budget, memory_budget=memory_budget,
                   refine=refine, seed=seed, knobs=knobs, nproc=nproc, plugins=plugin, decode_tokens=decode_tokens,
                   cuda_graphs=cuda_graphs)
    spec = api.resumed_spec(out, options) if resume else api.sweep_spec(**options, oversubscribe=oversubscribe)
    out_dir = out or api.new_run_dir(spec)
    with interruptible(out_dir, f"racebench sweep --resume --out {out_dir}"), sweep_progress(spec, console) as progress:
        store = api.sweep(spec, out_dir, resume=resume, command=_command_line(), progress=progress)
    _, df = api.load_run(store.path)
    show(thresholds_table(df))
    console.print(f"results: {store.path}/results.csv  (run.json, points.jsonl beside it)")
    if (why := api.nothing_ran(df)) is not None:
        raise RunFailedError(f"no point of this sweep ran: {why}")


def _knob_parameter(name: str, declared: list) -> inspect.Parameter:
    """The sweep option of one knob, from the records of the methods that declare it."""
    knob = declared[0][1]
    first = knob.describe_default()
    default = "; ".join([first] + [f"{m}: {k.describe_default()}" for m, k in declared
                                   if k.describe_default() != first])
    choices = list(dict.fromkeys(c for _, k in declared for c in k.choices))
    metavar = "|".join(map(str, choices)) if choices else f"{knob.type.__name__.upper()} ({knob.allowed()})"
    option = typer.Option(knob.option, metavar=metavar, show_default=False,
                          help=f"{knob.help} Methods: {', '.join(dict.fromkeys(m for m, _ in declared))}. "
                               f"(default: {default})")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[knob.type | None, option])


def _sweep_command():
    """sweep() with one option per knob of the registered methods in place of **knobs."""
    declared: dict[str, list] = {}  # knob name -> [(method name, Knob)]
    for m in api.methods():
        for k in m.knobs:
            declared.setdefault(k.name, []).append((m.name, k))
    params = [p for p in inspect.signature(sweep, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [_knob_parameter(name, d) for name, d in declared.items()]

    @functools.wraps(sweep)
    def command(**kwargs):
        return sweep(**kwargs)

    command.__signature__ = inspect.Signature(params)
    return command


def baseline(
    device: Annotated[str, typer.Option(metavar="auto|cpu|cuda", help="The device to record it on.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Run folder. (default: results/baselines/<device model>)")] = None,
    where: Annotated[bool, typer.Option("--where", help="Print the default folder for this machine and exit.")] = False,
) -> None:
    """Record a CI baseline: the ci-cpu or ci-gpu preset into results/baselines/<device model>, the folder the
    regression workflows compare against (commit it)."""
    from racebench.views.progress import sweep_progress

    device = api.resolve_device(device)
    folder = out or api.baseline_dir(device)
    if where:
        console.print(str(folder), highlight=False)
        return
    spec = api.sweep_spec(preset=f"ci-{device}")
    with sweep_progress(spec, console) as progress:
        store = api.sweep(spec, folder, command=_command_line(), progress=progress)
    console.print(f"baseline: {store.path} (commit it; `racebench compare {store.path} NEW` gates a change)")


def fidelity(
    preset: Annotated[str | None, typer.Option(metavar="default|theory|pareto|beta", help="default: every "
                                               "approximation at its defaults, race over L; theory: race against "
                                               "angular attention over L at beta = 1000; pareto: error against "
                                               "time over knobs; beta: race over beta.")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods. (default: the preset's)")] = None,
    lengths: Annotated[str | None, typer.Option(help="Comma-separated lengths, at most 2^14: the references are "
                                                "T x T. (default: the preset's)")] = None,
    inputs: Annotated[str | None, typer.Option(metavar="gaussian,clustered,model", help="Kinds of inputs. "
                                               "(default: the preset's)")] = None,
    grid: Annotated[list[str] | None, typer.Option(help="A knob's values to cross with the others, e.g. "
                                                   "race_L=8,32,128; repeatable. (default: the preset's)")] = None,
    knob: Annotated[list[str] | None, typer.Option(help="A knob's fixed value, e.g. race_beta=1000; "
                                                   "repeatable.")] = None,
    draws: Annotated[int | None, typer.Option(help="Fresh draws of inputs and random parameters per point. "
                                              "(default: 3)")] = None,
    heads: Annotated[int | None, typer.Option("--heads", "-H", help="Heads. (default: 4)")] = None,
    head_dim: Annotated[int | None, typer.Option("--head-dim", "-D", help="Head dimension. (default: 128)")] = None,
    causal: Annotated[bool, typer.Option("--causal/--non-causal", help="Causal masking.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the first draw. (default: 0)")] = None,
    timed: Annotated[bool, typer.Option("--time/--no-time", help="Measure each setting's time per fwd+bwd "
                                        "pass (fp32, its own process).")] = True,
    time_budget: Annotated[str | None, typer.Option(help="Time allowed per timed point. (default: 60s)")] = None,
    model: Annotated[str | None, typer.Option(help="--inputs model: a `racebench quality` run folder; its softmax "
                                              "model computes the q, k, v.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder. (default: results/fidelity-<preset>-<time>)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out.")] = False,
    plugin: Plugins = None,
) -> None:
    """How good, beside how fast: each method's output error against exact softmax attention (race's also against
    the angular attention it estimates), read against uniform attention's, with its time per pass."""
    import datetime as dt

    from racebench.views.fidelity import fidelity_progress, fidelity_table

    if resume:
        if out is None:
            raise UsageError("--resume needs --out: the folder of the run to continue")
        spec = api.resumed_fidelity_spec(out)
    else:
        spec = api.fidelity_spec(preset=preset, methods=methods, lengths=lengths, inputs=inputs, grid=grid,
                                 knobs=knob, draws=draws, heads=heads, head_dim=head_dim, causal=causal, seed=seed,
                                 timed=timed, time_budget=time_budget, model=model, plugins=plugin)
    out_dir = out or api.RESULTS_DIR / f"fidelity-{spec.preset}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    with interruptible(out_dir, f"racebench fidelity --resume --out {out_dir}"), \
            fidelity_progress(spec, console) as progress:
        store = api.fidelity(spec, out_dir, command=_command_line(), resume=resume, progress=progress)
    _, df = api.load_run(store.path)
    show(fidelity_table(df))
    console.print(f"results: {store.path}/results.csv; figures: racebench plot {store.path}")


def quality(
    preset: Annotated[str | None, typer.Option(metavar="default|gpu", help="default: about 10 minutes on a 2-core "
                                               "CPU; gpu: longer sequences, a wider model.")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated causal methods. (default: flash, race, "
                                                "linear, performer)")] = None,
    lengths: Annotated[str | None, typer.Option(help="Sequence lengths. (default: 128,256)")] = None,
    pairs: Annotated[str | None, typer.Option(help="Key-value pair counts, trained on in turn and scored; at most "
                                              "T / 4 and 31 (the vocabulary's keys). (default: 4,8,16)")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps of 32 sequences. (default: 350)")] = None,
    d_model: Annotated[int | None, typer.Option(help="Model width. (default: 64)")] = None,
    knob: Annotated[list[str] | None, typer.Option(help="A method knob's value, e.g. race_L=8; repeatable.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the model, the data and the methods' random "
                                             "parameters. (default: 0)")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder. (default: results/quality-<preset>-<time>)")] = None,
    plugin: Plugins = None,
) -> None:
    """Train a small model on multi-query associative recall with each attention method swapped in (same seed,
    steps and optimizer) and score it on held-out sequences against the number of key-value pairs."""
    import datetime as dt

    from racebench.views.quality import quality_progress, quality_table

    spec = api.quality_spec(preset=preset, methods=methods, lengths=lengths, pairs=pairs, steps=steps,
                            d_model=d_model, seed=seed, knobs=knob, plugins=plugin)
    out_dir = out or api.RESULTS_DIR / f"quality-{spec.preset}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    with interruptible(out_dir), quality_progress(spec, console) as progress:
        store = api.quality(spec, out_dir, command=_command_line(), progress=progress)
    _, df = api.load_run(store.path)
    show(quality_table(df))
    console.print(f"results: {store.path}/results.csv; figures: racebench plot {store.path}")


def env() -> None:
    """Print the environment that every run records in its run.json."""
    from racebench.views.tables import environment_table

    show(environment_table(api.environment()))


def plot(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders (default: the latest run). Several "
                                                      "runs share one figure, told apart by device.")] = None,
    fmt: Annotated[str, typer.Option("--format", metavar="png|svg|pdf", help="Image format.")] = "png",
    out: Annotated[Path | None, typer.Option(help="Folder for the figures. (default: plots/<run-id>)")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods to draw. (default: all)")] = None,
    title: Annotated[bool, typer.Option("--title/--no-title", help="Titles naming the configuration.")] = True,
    size: Annotated[str | None, typer.Option(metavar="W,H", help="Figure size in inches, e.g. 6.5,4. (default: "
                                             "the style's)")] = None,
    style: Annotated[str, typer.Option(metavar="paper|slides", help="paper: small type, 300 dpi; slides: large "
                                       "type, thick lines.")] = "paper",
) -> None:
    """Draw time and peak memory against context length, the largest context per method and the speedup over the
    baseline method, and the headline figure: race's fastest against the fastest softmax, with the crossover."""
    for path in api.plot(runs, out=out, fmt=fmt, methods=methods, title=title, size=size, style=style):
        console.print(f"wrote {path}")


def report(
    run: Annotated[Path | None, typer.Argument(help="Run folder (default: the latest run).")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the report as markdown to this file; - is standard "
                                                  "output.")] = None,
    at: Annotated[str | None, typer.Option(help="Comma-separated lengths to show time and memory at. (default: "
                                           "the baseline method's largest and the longest completed)")] = None,
) -> None:
    """Summarize a run: per method the largest length completed, the threshold and its cause, time, speedup
    over the baseline method and peak memory against the floor; and the run's environment."""
    from racebench.views.tables import environment_table, frame_table

    kind = api.load_meta(run or api.latest_run()).get("kind", "sweep")
    if kind != "sweep":  # a fidelity or quality run: its own table
        if markdown or at:
            raise UsageError(f"report --markdown and --at read sweeps; {run} is a {kind} run")
        from racebench.views.fidelity import fidelity_table
        from racebench.views.quality import quality_table

        meta, df = api.load_run(run or api.latest_run())
        show((fidelity_table if kind == "fidelity" else quality_table)(df))
        show(environment_table(meta["environment"]))
        return
    if markdown:
        write_text(str(markdown), api.report_markdown(run, at=at))
        return
    meta, summary, versus, crossings = api.report(run, at=at)
    show(frame_table(summary, f"racebench run {meta['run_id']}: {meta.get('command', '')}"))
    if not versus.empty:
        from racebench.views.report import VERSUS_TITLE

        show(frame_table(versus, VERSUS_TITLE))
        for line in crossings:
            console.print(line)
    show(environment_table(meta["environment"]))


def compare(
    baseline: Annotated[Path, typer.Argument(help="Run folder of the baseline.")],
    candidate: Annotated[Path, typer.Argument(help="Run folder of the candidate.")],
    max_slowdown: Annotated[str, typer.Option(help="Tolerated slowdown per point, at 95% confidence: 10% or "
                                              "1.1x.")] = "10%",
    max_memory_growth: Annotated[str, typer.Option(help="Tolerated peak-memory growth per point: 5% or "
                                                   "1.05x.")] = "5%",
    max_threshold_drop: Annotated[str, typer.Option(help="Tolerated drop of a method's largest completed "
                                                    "length.")] = "0%",
    allow_mismatch: Annotated[bool, typer.Option(help="Compare runs from different device models or torch / "
                                                 "Triton versions (the output says what differs).")] = False,
    fmt: Annotated[str, typer.Option("--format", metavar="table|markdown|json",
                                     help="table for a terminal, markdown for a pull request, json for bots.")]
    = "table",
    output: Annotated[str, typer.Option(help="Write the output to this file; - is standard output.")] = "-",
) -> None:
    """Gate a candidate run against a baseline: exit 1 when a point got slower (beyond its repeats' noise) or
    bigger than the limits, a point failed or went missing, or a method's largest length fell; 0 otherwise; 2 when
    the runs cannot be compared."""
    from racebench.views import compare as views

    if fmt not in views.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(views.FORMATS)}, not {fmt!r}")
    result = api.compare(baseline, candidate, max_slowdown=max_slowdown, max_memory_growth=max_memory_growth,
                         max_threshold_drop=max_threshold_drop, allow_mismatch=allow_mismatch)
    if fmt == "table":
        table = views.to_table(result, f"{candidate} against {baseline}")
        differ = f"[yellow]the runs differ:[/] {escape('; '.join(result.mismatches))}" if result.mismatches else None
        if output == "-":
            if differ:
                console.print(differ, highlight=False, soft_wrap=True)
            show(table)
        else:
            out = Console(file=io.StringIO(), width=160)
            if differ:
                out.print(differ, highlight=False, soft_wrap=True)
            out.print(table)
            write_text(output, out.file.getvalue())
    else:
        render = views.to_markdown if fmt == "markdown" else views.to_json
        write_text(output, render(result, str(baseline), str(candidate)))
    for note in result.regressions:
        err_console.print(f"[red]regression:[/] {note}", highlight=False)
    raise typer.Exit(1 if result.regressions else 0)


def write_text(path: str, text: str) -> None:
    """Write to a file, or to standard output for '-'; an unwritable path is a one-line error."""
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    console.print(f"wrote {path}")


class _ConsoleLog(logging.Handler):
    """racebench's log lines (a kernel build starting, a file repaired) on standard error, one line each."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "[yellow]warning:[/] " if record.levelno >= logging.WARNING else ""
        err_console.print(prefix + escape(record.getMessage()), highlight=False)


def _log_to_console() -> None:
    logger = logging.getLogger("racebench")
    if not any(isinstance(h, _ConsoleLog) for h in logger.handlers):
        logger.addHandler(_ConsoleLog())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def make_app() -> typer.Typer:
    """The Typer app, its sweep options generated from the methods registered now."""
    _log_to_console()
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Benchmarks for long-context attention: RACE against FlashAttention and linear attention.")

    @app.callback()
    def root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print racebench's version and exit.")] = False) -> None:
        """Benchmarks for long-context attention: RACE against FlashAttention and linear attention."""

    for fn in (methods, _sweep_command(), baseline, fidelity, quality, env, plot, report, compare):
        app.command(fn.__name__)(user_errors(fn))
    return app


def _plugins_in(argv: list[str]) -> list[str]:
    """The files named by --plugin on a command line (loaded before the app is built, for their knob options)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def main() -> None:
    """The `racebench` command."""
    try:
        api.load_plugins(_plugins_in(sys.argv[1:]))
        application = make_app()
    except RacebenchError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise SystemExit(exc.exit_code) from None
    application(prog_name="racebench")


app = make_app()
