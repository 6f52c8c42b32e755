"""How good, beside how fast: each method's output against exact softmax attention (scale 1/sqrt(D)) and, for race,
against the exact angular attention it estimates (gamma = P, RACE.md), on inputs that mean something, read
against the floor of uniform attention. Everything in float64, so the figures are the approximations' own, not
rounding's; each point also carries the time per fwd+bwd pass of the same method and knobs, measured in a process
of its own with the sweep's protocol (fp32)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from racebench.errors import UsageError
from racebench.methods.registry import BuildConfig, get_method, list_methods

INPUTS = ("gaussian", "clustered", "model")
KL_MAX_T = 1024  # attention weights are formed, T x T per head, up to this length
CENTRES = 8  # clustered inputs: centres per head


@dataclass(frozen=True)
class FidelitySpec:
    methods: tuple[str, ...]
    lengths: tuple[int, ...]
    inputs: tuple[str, ...] = ("gaussian", "clustered")
    grid: dict[str, tuple] = field(default_factory=dict)  # knob -> values, crossed for each method that has it
    knobs: dict[str, Any] = field(default_factory=dict)  # fixed knob values
    draws: int = 3
    B: int = 1
    H: int = 4
    D: int = 128
    causal: bool = False
    seed: int = 0
    timed: bool = True  # measure each setting's time per pass
    model: str | None = None  # a quality run's saved softmax model: the `model` inputs
    preset: str = "default"
    time_budget_s: float = 60.0
    memory_budget_bytes: int = 2**30
    plugins: tuple[str, ...] = ()

    def settings(self, method: str) -> list[dict[str, Any]]:
        """The knob settings of `method` the grid asks for: the product of the grid's values of its knobs."""
        names = {k.name for k in get_method(method).knobs}
        fixed = {k: v for k, v in self.knobs.items() if k in names}
        axes = [(k, vs) for k, vs in self.grid.items() if k in names]
        return [fixed | dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]

    def config(self, method: str, T: int, knobs: dict, *, seed: int, dtype: str = "fp64") -> BuildConfig:
        return BuildConfig(self.B, self.H, T, self.D, dtype, "cpu", self.causal, seed, knobs)


def make_inputs(kind: str, B: int, H: int, T: int, D: int, seed: int, model_qkv=None):
    """q, k, v [B, H, T, D] in float64. gaussian: N(0, 1) entries (softmax's scores ~ N(0, 1): broad attention).
    clustered: queries and keys around CENTRES shared centres per head (N(0, 1) entries) plus N(0, 1.5^2) noise: a
    query's own cluster scores about sqrt(D) above the others, and the noise spreads the scores within it by a few
    units, so softmax attends to a handful of keys (2.0 nats of entropy per row at T = 512, D = 128, against 5.7 for
    gaussian inputs and log T = 6.2 for uniform attention). model:
    the q, k, v a trained model's first attention layer computes (model_qkv(T, seed))."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return tuple(torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    if kind == "clustered":
        centres = torch.randn(B, H, CENTRES, D, generator=gen, dtype=torch.float64)

        def around():
            which = torch.randint(CENTRES, (B, H, T), generator=gen)
            picked = torch.gather(centres, 2, which.unsqueeze(-1).expand(B, H, T, D))
            return picked + 1.5 * torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)

        return around(), around(), torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    if kind == "model":
        if model_qkv is None:
            raise UsageError("--inputs model needs a trained model (racebench quality writes one)")
        return model_qkv(T, seed)
    raise UsageError(f"--inputs takes {', '.join(INPUTS)}, not {kind!r}")


def softmax_exact(q, k, v, causal: bool):
    """Exact softmax attention: the plain definition (reference) of the method speedups are measured against, which
    computes softmax exactly."""
    from racebench.methods.registry import baseline_method

    B, H, T, D = q.shape
    return get_method(baseline_method()).reference(BuildConfig(B, H, T, D, "fp64", "cpu", causal))(q, k, v)


def uniform_attention(v, causal: bool):
    """The mean of v over the visible keys: the error an approximation must beat to say anything of the scores."""
    import torch

    if not causal:
        return v.mean(-2, keepdim=True).expand_as(v)
    counts = torch.arange(1, v.shape[-2] + 1, dtype=v.dtype).unsqueeze(-1)
    return v.cumsum(-2) / counts


def relative_error(o, ref) -> float:
    """||o - ref||_F / ||ref||_F over the whole output."""
    return float((o - ref).norm() / ref.norm())


def row_cosine(o, ref) -> float:
    """The mean over rows (every query of every head) of the cosine between o's row and ref's."""
    import torch.nn.functional as F

    return float(F.cosine_similarity(o, ref, dim=-1).mean())


def attention_weights(fn, q, k):
    """The [B, H, T, T] weights of a method that is linear in v (all of racebench's: o = A(q, k) v), read off its
    outputs for one-hot values, D columns at a time."""
    import torch

    B, H, T, D = q.shape
    eye = torch.eye(T, dtype=q.dtype)
    cols = []
    for start in range(0, T, D):
        block = torch.zeros(T, D, dtype=q.dtype)
        width = min(D, T - start)
        block[:, :width] = eye[:, start:start + width]
        cols.append(fn(q, k, block.expand(B, H, T, D).contiguous())[..., :width])
    return torch.cat(cols, -1)


def kl_rows(p, r) -> float | None:
    """The mean over rows of KL(p || r): how far a method's weights r are from softmax's p, in nats. None when r is
    not a distribution per row (a negative weight: Linformer's projected values)."""
    import torch

    if bool((r < -1e-12).any()):
        return None
    r = r.clamp_min(1e-300) / r.sum(-1, keepdim=True)
    p = p / p.sum(-1, keepdim=True)
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - r.log()), torch.zeros_like(p))
    return float(terms.sum(-1).mean())


def target_of(method: str, cfg: BuildConfig):
    """(what it is, its definition) of the exact attention a method estimates besides softmax (its record's
    `estimates`: race's angular attention with gamma = P), or None."""
    m = get_method(method)
    return None if m.estimates is None else m.estimates(cfg)


def draw_errors(spec: FidelitySpec, method: str, knobs: dict, T: int, q, k, v, refs: References,
                seed: int) -> tuple[dict, tuple | None]:
    """One draw's errors of one method and setting against the references of these inputs, and the method's target
    (target_of) or None."""
    import torch

    cfg = spec.config(method, T, knobs, seed=seed)
    m = get_method(method)
    m.check(cfg)
    fn = m.build(cfg)
    with torch.no_grad():
        o = fn(q, k, v)
        out = dict(err_softmax=relative_error(o, refs["softmax"]), cos_softmax=row_cosine(o, refs["softmax"]))
        if (target := target_of(method, cfg)) is not None:
            out["target"], out["err_target"] = target[0], relative_error(o, refs.target(*target))
        if "weights" in refs:
            out["kl_softmax"] = kl_rows(refs["weights"], attention_weights(fn, q, k))
    return out, target


class References(dict):
    """Exact outputs for one draw of inputs: softmax, uniform attention, and each method's target (computed on first
    use, once per kind: race's angular attention per gamma)."""

    def __init__(self, q, k, v, causal: bool, *, weights: bool):
        import torch

        super().__init__(softmax=softmax_exact(q, k, v, causal), uniform=uniform_attention(v, causal))
        if weights:
            T = q.shape[-2]
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            if causal:
                scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
            self["weights"] = scores.softmax(-1)
        self._qkv, self._targets = (q, k, v), {}

    def target(self, label: str, fn):
        if label not in self._targets:
            import torch

            with torch.no_grad():
                self._targets[label] = fn(*self._qkv)
        return self._targets[label]


def summarize(draws: list[dict], floors: list[dict]) -> dict:
    """Mean and standard deviation over draws of each error, and the uniform floor's."""
    out: dict[str, Any] = {}
    for key in ("err_softmax", "cos_softmax", "kl_softmax", "err_target"):
        values = [d[key] for d in draws if d.get(key) is not None]
        if values:
            mean = sum(values) / len(values)
            out[key] = mean
            out[f"{key}_std"] = (sum((x - mean) ** 2 for x in values) / (len(values) - 1)) ** 0.5 if len(
                values) > 1 else 0.0
    for key in ("floor_softmax", "floor_target"):
        values = [f[key] for f in floors if f.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    if labels := [d["target"] for d in draws if d.get("target")]:
        out["target"] = labels[0]
    return out


# Each preset fills the options left out (racebench fidelity --preset NAME); its methods are those whose record
# lists its tag.
PRESETS: dict[str, dict[str, Any]] = {
    # Every approximation against softmax at its default knobs, race over a few L: a few minutes on 2 cores.
    "default": dict(tag="fidelity", lengths="1K,4K", inputs="gaussian,clustered", grid=["race_L=1,3,8,32"]),
    # The theory: race's error against angular attention at large beta over L, the 1/sqrt(L) law.
    "theory": dict(tag="fidelity-race", lengths="4K", inputs="clustered", grid=["race_L=8,32,128,512,2048"],
                   knobs=["race_beta=1000"]),
    # Error against time per pass: race over P and L, Performer over its features, Linformer over k.
    "pareto": dict(tag="fidelity-pareto", lengths="4K", inputs="clustered",
                   grid=["race_P=2,3,4,6", "race_L=3,8,32,128", "performer_features=64,256,1024",
                         "linformer_k=32,128,512"]),
    # Error against beta: the P / beta bias of the soft hash.
    "beta": dict(tag="fidelity-race", lengths="4K", inputs="clustered", grid=["race_beta=0.5,1,2,4,8,32,128,1000"],
                 knobs=["race_L=512"]),
}


def parse_assignments(items, methods: tuple[str, ...], *, many: bool) -> dict[str, Any]:
    """NAME=VALUE (many: NAME=V1,V2,...) for knobs of the methods given, each value checked by its knob record."""
    out: dict[str, Any] = {}
    option = "--grid" if many else "--knob"
    for item in items or ():
        name, sep, text = str(item).partition("=")
        name = name.strip().replace("-", "_").lstrip("_")
        declared = [k for m in methods for k in get_method(m).knobs if k.name == name]
        if not sep or not text.strip():
            raise UsageError(f"{option} {item!r}: write NAME={'V1,V2' if many else 'VALUE'}, e.g. race_L=8")
        if not declared:
            raise UsageError(f"{option} {item!r}: no method of this run has the knob {name} "
                             f"(methods: {', '.join(methods)})")
        values = tuple(declared[0].parse(v.strip()) for v in text.split(",") if v.strip()) if many else (
            declared[0].parse(text.strip()),)
        if many and len(set(values)) != len(values):
            raise UsageError(f"{option} {item!r} lists a value twice")
        out[name] = values if many else values[0]
    return out


def build_fidelity_spec(*, preset: str | None = None, methods: str | None = None, lengths: str | None = None,
                        inputs: str | None = None, grid=None, knobs=None, draws: int | None = None,
                        heads: int | None = None, head_dim: int | None = None, causal: bool | None = None,
                        seed: int | None = None, timed: bool = True, time_budget: str | None = None,
                        model: str | None = None,
                        plugins=()) -> FidelitySpec:
    """Options as the CLI gives them (None = not given) -> a validated FidelitySpec."""

    from racebench.bench.spec import choose_preset, default_memory_budget, load_plugin_files, parse_methods
    from racebench.bench.units import parse_duration, parse_lengths

    plugin_paths = load_plugin_files(plugins)
    name, p = choose_preset(PRESETS, preset, "fidelity")
    method_names = parse_methods(methods) if methods is not None else tuple(
        m.name for m in list_methods() if p["tag"] in m.presets)
    kinds = tuple(x.strip() for x in (p["inputs"] if inputs is None else inputs).split(",") if x.strip())
    if not kinds:
        raise UsageError("--inputs names no kind of inputs")
    for kind in kinds:
        if kind not in INPUTS:
            raise UsageError(f"--inputs takes {', '.join(INPUTS)}, not {kind!r}")
    lens = tuple(parse_lengths(p["lengths"] if lengths is None else lengths))
    if max(lens) > 2**14:
        raise UsageError(f"--lengths: fidelity forms T x T references in float64; at most 2^14, not {max(lens)}")
    model_file = None
    if "model" in kinds:
        from racebench.quality.model import model_inputs

        model_file = model_path(model)
        _, model_T = model_inputs(model_file, 1, 128 if head_dim is None else int(head_dim))
        if max(lens) > model_T:
            raise UsageError(f"--inputs model: the model reads sequences of up to {model_T} tokens; --lengths "
                             f"asks for {max(lens)}")
    elif model:
        raise UsageError("--model gives the inputs of --inputs model; add model to --inputs")
    count = 3 if draws is None else int(draws)
    if count < 1:
        raise UsageError(f"--draws must be at least 1, got {count}")
    H, D = (4 if heads is None else int(heads)), (128 if head_dim is None else int(head_dim))
    if H < 1 or D < 1:
        raise UsageError("--heads and --head-dim must be positive")
    have = {k.name for m in method_names for k in get_method(m).knobs}

    def preset_items(key: str) -> list[str]:  # the preset's grid and knobs, for the knobs these methods have
        return [item for item in p.get(key, []) if item.split("=")[0] in have]

    return FidelitySpec(
        methods=method_names, lengths=lens, inputs=kinds,
        grid=parse_assignments(grid if grid else preset_items("grid"), method_names, many=True),
        knobs=parse_assignments(knobs if knobs else preset_items("knobs"), method_names, many=False),
        draws=count, H=H, D=D, causal=bool(causal), seed=int(seed or 0), timed=timed, preset=name,
        time_budget_s=parse_duration(time_budget or "60s"), memory_budget_bytes=default_memory_budget("cpu"),
        plugins=plugin_paths, model=model_file)


def model_path(given: str | None) -> str:
    """The saved softmax model of a quality run folder (the one of the longest sequences), or a .pt file."""
    from pathlib import Path

    if not given:
        raise UsageError("--inputs model needs --model: a `racebench quality` run folder (it saves its softmax "
                         "model there)")
    path = Path(given)
    if path.is_dir():
        found = sorted(path.glob("model-*-T*.pt"), key=lambda p: int(p.stem.rsplit("-T", 1)[1]))
        if not found:
            raise UsageError(f"--model {given}: no saved model in it (model-<method>-T<length>.pt)")
        path = found[-1]
    if not path.is_file():
        raise UsageError(f"--model {given}: no such file or folder")
    return str(path.resolve())


def stored_spec(meta: dict) -> FidelitySpec:
    """The FidelitySpec a fidelity run's run.json records (--resume continues it as recorded)."""
    from racebench.methods.registry import load_plugins

    try:
        d = dict(meta["spec"])
        for name in ("methods", "lengths", "inputs", "plugins"):
            d[name] = tuple(d.get(name) or ())
        d["grid"] = {k: tuple(v) for k, v in (d.get("grid") or {}).items()}
        load_plugins(d["plugins"])
        return FidelitySpec(**d)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"run.json's fidelity spec cannot be read ({type(exc).__name__}: {exc})") from None
