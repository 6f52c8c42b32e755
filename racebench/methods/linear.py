"""Linear-attention baselines in plain PyTorch autograd, as their papers define them: elu+1 linear
attention (Katharopoulos et al. 2020), Performer / FAVOR+ (Choromanski et al. 2021), Linformer
(Wang et al. 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from racebench.methods.registry import BuildConfig, Method, register_method

CHUNK = 64


def feature_attention(fq, fk, v, *, causal=False, eps=1e-6, chunk=CHUNK):
    """Linear attention with features fq, fk [B, H, T, F]: o_t = fq_t KV / (fq_t . A + eps), where
    A, KV sum over all keys (causal: keys j <= t, computed chunkwise so no [T, F, D] tensor exists)."""
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


def elu_features(x):
    return F.elu(x) + 1


def orthogonal_features(m: int, D: int, *, seed: int) -> torch.Tensor:
    """FAVOR+ projection [m, D]: blocks of orthonormal rows, each row rescaled to a Gaussian vector's norm."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.linalg.qr(torch.randn(D, D, generator=gen))[0].t() for _ in range(-(-m // D))]
    norms = torch.randn(m, D, generator=gen).norm(dim=1, keepdim=True)
    return torch.cat(blocks)[:m] * norms


def favor_features(x, proj, *, is_query, stabilizer=1e-6):
    """Positive random features of the softmax kernel exp(q.k / sqrt(D)): exp(w.x' - |x'|^2/2) / sqrt(m),
    x' = x / D^(1/4), shifted by a max (per row for queries, per head for keys) that cancels in the ratio."""
    x = x * x.shape[-1] ** -0.25
    proj_x = x @ proj.to(x.dtype).t()  # [B, H, T, m]
    diag = (x * x).sum(-1, keepdim=True) / 2
    shift = proj_x.amax(-1, keepdim=True) if is_query else proj_x.amax((-1, -2), keepdim=True)
    return (torch.exp(proj_x - diag - shift.detach()) + stabilizer) / math.sqrt(proj.shape[0])


def linformer_projections(T: int, k: int, *, seed: int) -> torch.Tensor:
    """E and F [2, k, T], Xavier-uniform like the published benchmark's initialization."""
    bound = math.sqrt(6 / (T + k))
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(2, k, T, generator=gen) * 2 - 1) * bound


def linformer_attention(q, k, v, E, Fp):
    """softmax(q (E k)^T / sqrt(D)) (F v) with sequence projections E, F [k, T]."""
    kp, vp = E.to(k.dtype) @ k, Fp.to(v.dtype) @ v  # [B, H, k, D]
    return torch.softmax(q @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ vp


def _build_linear(cfg: BuildConfig):
    return lambda q, k, v: feature_attention(elu_features(q), elu_features(k), v, causal=cfg.causal)


def _build_performer(cfg: BuildConfig):
    proj = orthogonal_features(cfg.knob("performer_features", 256), cfg.D, seed=cfg.seed).to(cfg.device)
    return lambda q, k, v: feature_attention(favor_features(q, proj, is_query=True),
                                             favor_features(k, proj, is_query=False), v, causal=cfg.causal)


def _build_linformer(cfg: BuildConfig):
    E, Fp = linformer_projections(cfg.T, cfg.knob("linformer_k", 128), seed=cfg.seed).to(cfg.device)
    return lambda q, k, v: linformer_attention(q, k, v, E, Fp)


register_method(Method(
    name="linear",
    description="Linear attention with elu(x)+1 features (Katharopoulos et al. 2020)",
    build=_build_linear,
))
register_method(Method(
    name="performer",
    description="Performer FAVOR+: 256 positive orthogonal random features by default",
    build=_build_performer,
    knobs=("performer_features",),
))
register_method(Method(
    name="linformer",
    description="Linformer: keys and values projected along the sequence to k = 128 (fixed projections)",
    build=_build_linformer,
    causal=False,
    knobs=("linformer_k",),
))
