"""RACE at the memory floor: a blocked linear-attention core under the soft-hash feature map.

RACE.md ("The key to a fast, lean implementation"): both normalizations are linear attention with
S = L * 2**P features, so the state is [S, D] per head. This module never forms [T, S, D]:
- each head is processed on its own, in blocks of BLOCK tokens, so every temporary is O(block * (S + D)) and
  every output block is written in place into o, dq, dk, dv (contiguous rows of one head); causal heads of short
  sequences go in groups of up to GROUP_TOKENS tokens per call (head_groups), fewer and larger operations;
- features are computed feature-major, [S, block]: the elementwise work of the soft hash runs over long
  contiguous rows instead of a last dimension of 2**P;
- non-causal: one pass over keys builds A [S] and KV [S, D], one pass over queries reads them;
- causal: inside a block, chunks of CHUNK tokens are exact (masked C x C scores) and chunk states are
  prefix-summed; the state entering each block is kept (tiny) for the backward, which walks blocks in
  reverse and carries the suffix sums of the state gradients;
- the backward recomputes phi from q and k instead of saving it; all accumulation is fp32 (fp64 for fp64
  inputs), whatever the input dtype.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from racebench.methods.race.hashing import corners

BLOCK = 8192  # 4 MiB blocks of fp32 rows at D = 128: small enough for the allocator to reuse
CHUNK = 64


def race_lean(q, k, v, planes, *, beta, causal=False, normalize="paper", eps=1e-6, block=None, chunk=None,
              comm=None, ops=None):
    """RACE attention on [B, H, T, D] tensors; planes [L, P, D]. See racebench.race_attention.

    comm: None for a whole sequence; for one shard of a sequence split across processes, an object with
    all_reduce(t) (sum in place) and prefix_suffix(t) (sums over the shards before and after this one), as
    parallel.py provides. ops: a module with this one's four non-causal per-head functions (key_state,
    query_forward, query_backward, key_backward), e.g. native.py's; None for this module's own."""
    return _RaceFunction.apply(q, k, v, planes, float(beta), causal, normalize, eps, block, chunk, comm, ops)


def race_lean_prefill(q, k, v, planes, *, beta, normalize="paper", eps=1e-6):
    """Causal RACE without autograd that also returns the state after the last token, from the same pass:
    (o [B, H, T, D], A [B, H, S], KV [B, H, S, D])."""
    B, H, T, D = q.shape
    N = B * H
    cfg = make_config(q, planes, float(beta), normalize, eps)
    q3, k3, v3 = (x.reshape(N, T, D) for x in (q, k, v))
    o = torch.empty_like(q3)
    finals = [causal_forward(q3[h], k3[h], v3[h], o[h], cfg)[2] for h in _groups(N, T, cfg)]
    A, KV = (torch.cat(s) for s in zip(*finals))
    return o.view(B, H, T, D), A.view(B, H, -1), KV.view(B, H, -1, D)


class _RaceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, planes, beta, causal, normalize, eps, block, chunk, comm, ops):
        B, H, T, D = q.shape
        N = B * H
        cfg = make_config(q, planes, beta, normalize, eps, block, chunk)
        ops = ops or sys.modules[__name__]
        q3, k3, v3 = (x.reshape(N, T, D) for x in (q, k, v))  # views for contiguous inputs
        o = torch.empty_like(q3)

        def stacked(pairs):
            return tuple(torch.stack(s) for s in zip(*pairs))

        if causal:
            A_in = KV_in = None  # the state entering this sequence: zero unless it continues a shard
            if comm is not None:
                totals = stacked(key_state(k3[n], v3[n], cfg) for n in range(N))
                A_in, KV_in = (comm.prefix_suffix(t)[0] for t in totals)
            parts = [causal_forward(q3[h], k3[h], v3[h], o[h], cfg, *((A_in[h], KV_in[h]) if comm else ()))
                     for h in _groups(N, T, cfg)]
            A, KV = (torch.cat(s) for s in zip(*(p[:2] for p in parts)))
        else:
            A, KV = stacked(ops.key_state(k3[n], v3[n], cfg) for n in range(N))
            if comm is not None:
                comm.all_reduce(A), comm.all_reduce(KV)
            for n in range(N):
                ops.query_forward(q3[n], A[n], KV[n], o[n], cfg)
        ctx.save_for_backward(q, k, v, A, KV)
        ctx.cfg, ctx.causal, ctx.comm, ctx.ops = cfg, causal, comm, ops
        return o.view(B, H, T, D)

    @staticmethod
    def backward(ctx, do):
        q, k, v, A, KV = ctx.saved_tensors
        B, H, T, D = q.shape
        N, cfg, comm, ops = B * H, ctx.cfg, ctx.comm, ctx.ops
        q3, k3, v3, do3 = (x.reshape(N, T, D) for x in (q, k, v, do))
        dq, dk, dv = (torch.empty_like(q3) for _ in range(3))
        if ctx.causal:
            grads = [causal_backward(q3[h], k3[h], v3[h], do3[h], A[h], KV[h], dq[h], dk[h], dv[h], cfg)
                     for h in _groups(N, T, cfg)]
            if comm is not None:  # every key here also feeds the state entering each later shard
                dA_in, dKV_in = (torch.cat(s) for s in zip(*grads))
                dA_later, dKV_later = (comm.prefix_suffix(t)[1] for t in (dA_in, dKV_in))
                for n in range(N):
                    key_backward(k3[n], v3[n], dA_later[n], dKV_later[n], dk[n], dv[n], cfg, accumulate=True)
        else:
            dA, dKV = (torch.stack(s) for s in zip(*[ops.query_backward(q3[n], do3[n], A[n], KV[n], dq[n], cfg)
                                                    for n in range(N)]))
            if comm is not None:
                comm.all_reduce(dA), comm.all_reduce(dKV)
            for n in range(N):
                ops.key_backward(k3[n], v3[n], dA[n], dKV[n], dk[n], dv[n], cfg)
        shape = (B, H, T, D)
        return dq.view(shape), dk.view(shape), dv.view(shape), *([None] * 9)


def make_config(q, planes, beta, normalize, eps, block=None, chunk=None):
    """Everything the per-head functions below share; accumulation in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return SimpleNamespace(hash=_Hasher(planes, beta, acc, q.device), normalize=normalize, eps=eps,
                           block=int(block or BLOCK), chunk=int(chunk or CHUNK), acc=acc)


class _Hasher:
    """Soft-hash features of a block of rows x [b, D], feature-major: phi(x)^T of shape [S, b]."""

    def __init__(self, planes, beta, dtype, device):
        self.L, self.P, D = planes.shape
        self.R, self.beta = 2**self.P, beta
        self.W = planes.reshape(self.L * self.P, D).to(device, dtype)  # [LP, D]
        self.Ct = corners(self.P, device=device, dtype=dtype).t().contiguous()  # [P, R]
        self.dtype = dtype

    def tanh_proj(self, x):
        return torch.tanh(torch.mm(self.W, x.to(self.dtype).t()))  # [LP, b]

    def probs(self, u):
        """Product over bits of sigmoid(+-2 beta u): the softmax over corners, factorized (see hashing.py)."""
        b = u.shape[1]
        z = (2 * self.beta) * u
        s = torch.stack((torch.sigmoid(-z), torch.sigmoid(z)), dim=1).view(self.L, self.P, 2, b)
        f = s[:, 0]  # [L, 2, b]; bit p = 0 is the most significant
        for p in range(1, self.P):
            f = (f.unsqueeze(2) * s[:, p].unsqueeze(1)).view(self.L, -1, b)
        return f.reshape(self.L * self.R, b)

    def __call__(self, x):
        return self.probs(self.tanh_proj(x))

    def vjp(self, u, g, out):
        """out <- the gradient of <phi(x)^T, g> with respect to x, from u = tanh_proj(x); g [S, b], out [b, D]."""
        b = u.shape[1]
        f, g = self.probs(u).view(self.L, self.R, b), g.reshape(self.L, self.R, b)
        dlogits = f * (g - (f * g).sum(1, keepdim=True))  # softmax backward
        du = torch.matmul(self.Ct, dlogits).view(-1, b)  # [LP, b]
        dh = du.mul_(self.beta).mul_(1 - u * u)  # through beta and tanh
        _mm_into(dh.t(), self.W, out)


def _mm_into(a, b, out):
    """out <- a @ b, written in place when dtypes allow (no temporary the size of out)."""
    if out.dtype == a.dtype and out.is_contiguous():
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _blocks(T, block):
    return [(s, min(s + block, T)) for s in range(0, T, block)]


# ----------------------------------------------------------------------------- non-causal


def key_state(k, v, cfg):
    """One head's keys and values [T, D] -> A [S] = sum_j phi(k_j), KV [S, D] = sum_j phi(k_j) v_j^T."""
    T, D = k.shape
    A = k.new_zeros(cfg.hash.L * cfg.hash.R, dtype=cfg.acc)
    KV = k.new_zeros(A.shape[0], D, dtype=cfg.acc)
    for s, e in _blocks(T, cfg.block):
        fk = cfg.hash(k[s:e])  # [S, b]
        A += fk.sum(1)
        KV.addmm_(fk, v[s:e].to(cfg.acc))
    return A, KV


def query_forward(q, A, KV, o, cfg):
    """o [T, D] <- RACE of one head's queries against the state (A, KV)."""
    Z = KV / (A + cfg.eps).unsqueeze(1) if cfg.normalize == "bucket" else KV
    for s, e in _blocks(q.shape[0], cfg.block):
        fq = cfg.hash(q[s:e])
        if cfg.normalize == "paper":
            fq = fq / (A @ fq + cfg.eps)  # divide the S x b features, not the b x D output
        _mm_into(fq.t(), Z, o[s:e])


def query_backward(q, do, A, KV, dq, cfg):
    """dq <- the gradient through the queries; returns these queries' share of the state's gradient (dA, dKV)."""
    dKV, dA = torch.zeros_like(KV), torch.zeros_like(A)
    if cfg.normalize == "bucket":
        a_eps = A + cfg.eps
        Z = KV / a_eps.unsqueeze(1)
    for s, e in _blocks(q.shape[0], cfg.block):
        u = cfg.hash.tanh_proj(q[s:e])
        fq = cfg.hash.probs(u)
        g = do[s:e].to(cfg.acc).contiguous()  # one copy where autograd passes a broadcast gradient
        if cfg.normalize == "paper":
            den = A @ fq + cfg.eps  # [b]
            G = KV @ g.t()  # [S, b]
            w = (fq * G).sum(0) / (den * den)
            dfq = G / den - A.unsqueeze(1) * w
            dKV.addmm_(fq / den, g)
            dA -= fq @ w
        else:
            dfq = Z @ g.t()
            dKV.addmm_(fq, g)  # the gradient of Z until the loop ends
        cfg.hash.vjp(u, dfq, dq[s:e])
    if cfg.normalize == "bucket":  # Z = KV / (A + eps): linear in the gradient of Z, so shares add up
        dA = -(dKV * Z).sum(1) / a_eps
        dKV = dKV / a_eps.unsqueeze(1)
    return dA, dKV


def key_backward(k, v, dA, dKV, dk, dv, cfg, accumulate=False):
    """dk, dv <- (or +=, with accumulate) the gradient through keys and values of a state gradient (dA, dKV)."""
    for s, e in _blocks(k.shape[0], cfg.block):
        u = cfg.hash.tanh_proj(k[s:e])
        g = torch.addmm(dA.unsqueeze(1), dKV, v[s:e].to(cfg.acc).t())  # [S, b]
        if accumulate:
            dv[s:e] += cfg.hash.probs(u).t() @ dKV
            dk_blk = torch.empty_like(dk[s:e], dtype=cfg.acc)
            cfg.hash.vjp(u, g, dk_blk)
            dk[s:e] += dk_blk
        else:
            _mm_into(cfg.hash.probs(u).t(), dKV, dv[s:e])
            cfg.hash.vjp(u, g, dk[s:e])


# ----------------------------------------------------------------------------- causal
# The causal functions take a group of G heads at once ([G, T, D]): the runner groups heads so that G * T stays
# within GROUP_TOKENS (head_groups), so short sequences cost a few large operations instead of a few small ones per
# head, and long ones (G = 1) keep the memory floor.
GROUP_TOKENS = 4096  # fastest or within noise of it at B x H x T = 32x1x128, 32x1x256, 8x4x512, 1x4x1024, 1x4x2048


def head_groups(N, T, tokens):
    """Slices of N heads, each of at most max(1, tokens // T) heads."""
    g = max(1, tokens // max(T, 1))
    return [slice(a, min(a + g, N)) for a in range(0, N, g)]


def _groups(N, T, cfg):
    return head_groups(N, T, min(cfg.block, GROUP_TOKENS))


def _chunked(x, C):
    """[G, b, F] -> [G, n, C, F], zero-padded to whole chunks (zero features contribute nothing)."""
    G, b, F_ = x.shape
    n = -(-b // C)
    return F.pad(x, (0, 0, 0, n * C - b)).view(G, n, C, F_)


def _features(cfg, x):
    """tanh projections u [LP, G*b] and features [G, b, S] of a group's rows x [G, b, D]."""
    G, b, D = x.shape
    u = cfg.hash.tanh_proj(x.reshape(G * b, D))
    return u, cfg.hash.probs(u).view(-1, G, b).permute(1, 2, 0)


def _feature_major(df, b):
    """[G, n, C, S] gradients of features -> [S, G*b], the layout of the hash's vjp."""
    G, S = df.shape[0], df.shape[-1]
    return df.flatten(1, 2)[:, :b].permute(2, 0, 1).reshape(S, G * b)


def exclusive_cumsum(x, dim):
    """Sums of the entries before each position along dim (zero first); shared with fused.py."""
    cs = x.cumsum(dim)
    return torch.cat((torch.zeros_like(cs.narrow(dim, 0, 1)), cs.narrow(dim, 0, x.shape[dim] - 1)), dim)


def reverse_exclusive_cumsum(x, dim):
    return exclusive_cumsum(x.flip(dim), dim).flip(dim)


def _causal_block(q, k, v, A_in, KV_in, cfg):
    """Forward math of one block of a group of heads (recomputed by the backward): q, k, v [G, b, D];
    A_in [G, S], KV_in [G, S, D]: the sums over all earlier blocks."""
    C = cfg.chunk
    (uq, fq), (uk, fk) = _features(cfg, q), _features(cfg, k)
    fq, fk = _chunked(fq, C), _chunked(fk, C)  # [G, n, C, S]
    vv = _chunked(v.to(cfg.acc), C)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= t inside a chunk
    chunk_kv = fk.transpose(-1, -2) @ vv  # [G, n, S, D]
    KV0 = KV_in.unsqueeze(1) + exclusive_cumsum(chunk_kv, 1)  # state entering each chunk
    r = SimpleNamespace(uq=uq, uk=uk, fq=fq, fk=fk, vv=vv, mask=mask, KV0=KV0,
                        A_out=A_in + fk.sum((1, 2)), KV_out=KV_in + chunk_kv.sum(1))
    if cfg.normalize == "paper":
        r.A0 = A_in.unsqueeze(1) + exclusive_cumsum(fk.sum(2), 1)  # [G, n, S]
        r.scores = (fq @ fk.transpose(-1, -2)) * mask  # [G, n, C, C]
        r.den = (fq * r.A0.unsqueeze(2)).sum(-1, keepdim=True) + r.scores.sum(-1, keepdim=True) + cfg.eps
        r.o = (fq @ KV0 + r.scores @ vv) / r.den
    else:
        G, n, _, S = fk.shape
        r.a_eps = (A_in.unsqueeze(1) + fk.view(G, n * C, S).cumsum(1)).view_as(fk) + cfg.eps  # A_t + eps
        r.qf = fq / r.a_eps
        r.scores = (r.qf @ fk.transpose(-1, -2)) * mask
        r.o = r.qf @ KV0 + r.scores @ vv
    return r


def causal_forward(q, k, v, o, cfg, A_in=None, KV_in=None):
    """A group of heads [G, T, D], causal; (A_in [G, S], KV_in [G, S, D]) is the state entering the sequence
    (zero unless it continues one). Returns the state entering each block ([G, blocks, S], [G, blocks, S, D])
    for the backward, and the state after the last token."""
    G, T, D = q.shape
    S = cfg.hash.L * cfg.hash.R
    blocks = _blocks(T, cfg.block)
    As = q.new_zeros(G, len(blocks), S, dtype=cfg.acc)
    KVs = q.new_zeros(G, len(blocks), S, D, dtype=cfg.acc)
    if A_in is not None:
        As[:, 0], KVs[:, 0] = A_in, KV_in
    for i, (s, e) in enumerate(blocks):
        r = _causal_block(q[:, s:e], k[:, s:e], v[:, s:e], As[:, i], KVs[:, i], cfg)
        o[:, s:e] = r.o.flatten(1, 2)[:, : e - s]
        if i + 1 < len(blocks):
            As[:, i + 1], KVs[:, i + 1] = r.A_out, r.KV_out
    return As, KVs, (r.A_out, r.KV_out)


def causal_backward(q, k, v, do, As, KVs, dq, dk, dv, cfg):
    """dq, dk, dv of a group of heads; returns the gradient of the state that entered the sequence
    (dA_in [G, S], dKV_in [G, S, D])."""
    G, T, D = q.shape
    dKV_later = torch.zeros_like(KVs[:, 0])  # gradient of the state from all later blocks
    dA_later = torch.zeros_like(As[:, 0])
    for i, (s, e) in reversed(list(enumerate(_blocks(T, cfg.block)))):
        b = e - s
        r = _causal_block(q[:, s:e], k[:, s:e], v[:, s:e], As[:, i], KVs[:, i], cfg)
        g = _chunked(do[:, s:e].to(cfg.acc), cfg.chunk)
        fq, fk, vv = r.fq, r.fk, r.vv
        if cfg.normalize == "paper":
            dnum = g / r.den
            dden = -(dnum * r.o).sum(-1, keepdim=True)  # [G, n, C, 1]
            dS = (dnum @ vv.transpose(-1, -2) + dden) * r.mask
            dfq = dnum @ r.KV0.transpose(-1, -2) + dden * r.A0.unsqueeze(2) + dS @ fk
            dfk = dS.transpose(-1, -2) @ fq
            dvv = r.scores.transpose(-1, -2) @ dnum
            dKV0 = fq.transpose(-1, -2) @ dnum  # [G, n, S, D]: gradient of each chunk's entering state
            dA0 = (fq * dden).sum(2)  # [G, n, S]
            # A key in chunk c feeds the entering state of every later chunk and block.
            dfk += (reverse_exclusive_cumsum(dA0, 1) + dA_later.unsqueeze(1)).unsqueeze(2)
            dA_later = dA_later + dA0.sum(1)
        else:
            dS = (g @ vv.transpose(-1, -2)) * r.mask
            dqf = g @ r.KV0.transpose(-1, -2) + dS @ fk
            dfk = dS.transpose(-1, -2) @ r.qf
            dvv = r.scores.transpose(-1, -2) @ g
            dKV0 = r.qf.transpose(-1, -2) @ g
            dfq = dqf / r.a_eps
            dA = (-(dqf * r.qf) / r.a_eps).flatten(1, 2)  # [G, n*C, S]: gradient of A_t
            # A_t sums the keys j <= t, so key j collects the gradient of every A_t with t >= j.
            dfk += (dA.flip(1).cumsum(1).flip(1) + dA_later.unsqueeze(1)).view_as(fk)
            dA_later = dA_later + dA.sum(1)
        later_kv = reverse_exclusive_cumsum(dKV0, 1) + dKV_later.unsqueeze(1)  # [G, n, S, D]
        dfk += vv @ later_kv.transpose(-1, -2)
        dvv += fk @ later_kv
        dKV_later = dKV_later + dKV0.sum(1)
        # One block per group when G > 1 (head_groups), so these row views cover whole heads and are views.
        cfg.hash.vjp(r.uq, _feature_major(dfq, b), dq[:, s:e].view(G * b, D))
        cfg.hash.vjp(r.uk, _feature_major(dfk, b), dk[:, s:e].view(G * b, D))
        dv[:, s:e] = dvv.flatten(1, 2)[:, :b]
    return dA_later, dKV_later
