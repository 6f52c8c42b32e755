"""Linear-attention baselines in plain PyTorch autograd, as their papers define them: elu+1 linear
attention (Katharopoulos et al. 2020), Performer / FAVOR+ (Choromanski et al. 2021), Linformer
(Wang et al. 2020). torch is imported inside the functions, so the records load without it."""

from __future__ import annotations

import math

from racebench.methods.registry import BuildConfig, Decoder, Knob, Method, register_method

CHUNK = 64


def feature_attention(fq, fk, v, *, causal=False, eps=1e-6, chunk=CHUNK):
    """Linear attention with features fq, fk [B, H, T, F]: o_t = fq_t KV / (fq_t . A + eps), where
    A, KV sum over all keys (causal: keys j <= t, computed chunkwise so no [T, F, D] tensor exists)."""
    import torch.nn.functional as F

    if not causal:
        kv = fk.transpose(-1, -2) @ v  # [B, H, F, D]
        den = fq @ fk.sum(-2).unsqueeze(-1)  # [B, H, T, 1]
        return (fq @ kv) / (den + eps)
    B, H, T, F_ = fq.shape
    n = -(-T // chunk)

    def chunks(x):  # [B, H, T, X] -> [B, H, n, C, X], zero-padded
        return F.pad(x, (0, 0, 0, n * chunk - T)).view(B, H, n, chunk, x.shape[-1])

    fq, fk, v = chunks(fq), chunks(fk), chunks(v)
    chunk_kv = fk.transpose(-1, -2) @ v  # [B, H, n, F, D]
    kv0 = chunk_kv.cumsum(2) - chunk_kv  # state entering each chunk
    a0 = (fk.sum(3).cumsum(2) - fk.sum(3)).unsqueeze(-1)  # [B, H, n, F, 1]
    scores = (fq @ fk.transpose(-1, -2)).tril()  # [B, H, n, C, C], j <= t
    num = fq @ kv0 + scores @ v
    den = fq @ a0 + scores.sum(-1, keepdim=True)
    return (num / (den + eps)).flatten(2, 3)[:, :, :T]


def quadratic_attention(fq, fk, v, *, causal=False, eps=1e-6):
    """Linear attention written as its T x T form: the reference for the chunked implementation."""
    w = fq @ fk.transpose(-1, -2)
    if causal:
        w = w.tril()
    return (w @ v) / (w.sum(-1, keepdim=True) + eps)


def feature_decoder(features, *, chunk=CHUNK, eps=1e-6) -> Decoder:
    """Linear attention's inference form: the causal forward over the prompt, then one token at a time from the
    state (KV = sum fk v^T [B, H, F, D], A = sum fk [B, H, F]; fp32, fp64 for fp64 inputs)."""
    import torch

    def prefill(q, k, v):
        fq, fk = features(q, True), features(k, False)
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        state = {"KV": fk.transpose(-1, -2).to(acc) @ v.to(acc), "A": fk.sum(-2).to(acc)}
        return feature_attention(fq, fk, v, causal=True, eps=eps, chunk=chunk), state

    def step(state, q, k, v):
        fq, fk = features(q, True)[..., 0, :], features(k, False)[..., 0, :]  # [B, H, F]
        acc = state["A"].dtype
        state["A"] += fk.to(acc)
        state["KV"] += fk.to(acc).unsqueeze(-1) * v[..., 0, :].to(acc).unsqueeze(-2)
        fq = fq.to(acc).unsqueeze(-2)
        o = (fq @ state["KV"]) / ((fq * state["A"].unsqueeze(-2)).sum(-1, keepdim=True) + eps)
        return o.to(v.dtype)

    return Decoder(prefill, step, lambda state: state["KV"].nbytes + state["A"].nbytes)


def elu_features(x):
    import torch.nn.functional as F

    return F.elu(x) + 1


def orthogonal_features(m: int, D: int, *, seed: int):
    """FAVOR+ projection [m, D]: blocks of orthonormal rows, each row rescaled to a Gaussian vector's norm."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.linalg.qr(torch.randn(D, D, generator=gen))[0].t() for _ in range(-(-m // D))]
    norms = torch.randn(m, D, generator=gen).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:m] * norms


def favor_features(x, proj, *, is_query, causal=False, stabilizer=1e-6):
    """Positive random features of the softmax kernel exp(q.k / sqrt(D)): exp(w.x' - |x'|^2/2) / sqrt(m),
    x' = x / D^(1/4), shifted by a max that cancels in the ratio: per row for queries, per head for keys. Causal keys
    are not shifted: a maximum over a head's keys looks at later keys, and with the stabilizer added after exp a
    large later key changed earlier outputs (by up to 1.36 for one key in 64, in float64)."""
    import torch

    x = x * x.shape[-1] ** -0.25
    proj_x = x @ proj.to(x.dtype).t()  # [B, H, T, m]
    diag = (x * x).sum(-1, keepdim=True) / 2
    if is_query:
        proj_x = proj_x - proj_x.amax(-1, keepdim=True).detach()
    elif not causal:
        proj_x = proj_x - proj_x.amax((-1, -2), keepdim=True).detach()
    return (torch.exp(proj_x - diag) + stabilizer) / math.sqrt(proj.shape[0])


def linformer_projections(T: int, k: int, *, seed: int):
    """E and F [2, k, T], Xavier-uniform like the published benchmark's initialization."""
    import torch

    bound = math.sqrt(6 / (T + k))
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(2, k, T, generator=gen) * 2 - 1) * bound


def linformer_attention(q, k, v, E, Fp):
    """softmax(q (E k)^T / sqrt(D)) (F v) with sequence projections E, F [k, T]."""
    kp, vp = E.to(k.dtype) @ k, Fp.to(v.dtype) @ v  # [B, H, k, D]
    return (q @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1) @ vp


LINEAR_CHUNK = Knob("linear_chunk", int, CHUNK, "linear, performer: tokens per chunk of the causal form.",
                    min=1, max=65536)
FEATURES = Knob("performer_features", int, 256, "Performer: random features (FAVOR+).", min=1, max=65536)
LINFORMER_K = Knob("linformer_k", int, 128, "Linformer: length the sequence is projected to.", min=1,
                   max=2**24)


def _linear(cfg: BuildConfig, reference=False):
    chunk = linear.effective_knobs(cfg)["linear_chunk"]
    if reference:
        return lambda q, k, v: quadratic_attention(elu_features(q), elu_features(k), v, causal=cfg.causal)
    return lambda q, k, v: feature_attention(elu_features(q), elu_features(k), v, causal=cfg.causal, chunk=chunk)


def _performer_projection(cfg: BuildConfig, knobs: dict):
    """The point's FAVOR+ projection [m, D], the same for the forward, the reference and the decode form."""
    return orthogonal_features(knobs["performer_features"], cfg.D, seed=cfg.seed).to(cfg.device)


def _performer(cfg: BuildConfig, reference=False):
    knobs = performer.effective_knobs(cfg)
    proj = _performer_projection(cfg, knobs)
    if reference:
        proj = proj.double()

    def attend(q, k, v):
        fq, fk = favor_features(q, proj, is_query=True), favor_features(k, proj, is_query=False, causal=cfg.causal)
        if reference:
            return quadratic_attention(fq, fk, v, causal=cfg.causal)
        return feature_attention(fq, fk, v, causal=cfg.causal, chunk=knobs["linear_chunk"])

    return attend


def _performer_decoder(cfg: BuildConfig) -> Decoder:
    knobs = performer.effective_knobs(cfg)
    proj = _performer_projection(cfg, knobs)
    return feature_decoder(lambda x, is_query: favor_features(x, proj, is_query=is_query, causal=True),
                           chunk=knobs["linear_chunk"])


def _linformer(cfg: BuildConfig, reference=False):
    E, Fp = linformer_projections(cfg.T, linformer.effective_knobs(cfg)["linformer_k"], seed=cfg.seed).to(cfg.device)
    if reference:
        E, Fp = E.double(), Fp.double()
    return lambda q, k, v: linformer_attention(q, k, v, E, Fp)


linear = register_method(Method(
    name="linear",
    description="Linear attention with elu(x)+1 features (Katharopoulos et al. 2020)",
    build=_linear,
    reference=lambda cfg: _linear(cfg, reference=True),
    knobs=(LINEAR_CHUNK,),
    decode=lambda cfg: feature_decoder(lambda x, is_query: elu_features(x),
                                       chunk=linear.effective_knobs(cfg)["linear_chunk"]),
    color="tab:red",
    marker=">",
    family="linear",
    presets=frozenset({"default", "paper", "quick", "ci", "fidelity"}),
))
performer = register_method(Method(
    name="performer",
    description="Performer FAVOR+: 256 positive orthogonal random features by default",
    build=_performer,
    reference=lambda cfg: _performer(cfg, reference=True),
    knobs=(FEATURES, LINEAR_CHUNK),
    decode=lambda cfg: _performer_decoder(cfg),
    color="tab:purple",
    marker="*",
    family="linear",
    presets=frozenset({"default", "paper", "fidelity", "fidelity-pareto"}),
))
linformer = register_method(Method(
    name="linformer",
    description="Linformer: keys and values projected along the sequence to k = 128 (fixed projections)",
    build=_linformer,
    reference=lambda cfg: _linformer(cfg, reference=True),
    knobs=(LINFORMER_K,),
    causal=False,
    color="tab:brown",
    marker="h",
    family="low-rank",
    presets=frozenset({"default", "paper", "fidelity", "fidelity-pareto"}),
))
