"""Triton kernels of RACE: the soft hash fused into linear-attention tiles (fused.py launches them).

Every kernel works on one range of tokens p (program_id 0) of one head n (program_id 1): the long axis goes
first, since CUDA allows 2^31 - 1 programs there and only 65,535 on the second. causal_dkv_kernel is the
exception: its programs each take a series of (head, range) items. Row offsets are int64: B * H * T * D
reaches 2^31 at 4M tokens. The soft-hash features
of a q or k tile are computed in registers and never written out; the backward recomputes them:
  u = tanh(x W^T), z = 2 beta u,  log phi_(l,r) = sum_p logsigmoid(c_rp z_lp)
                                             = (logsigmoid(z) @ G - z @ M)_(l,r),
with G[lp, lr] = 1 (bit p of table l feeds every bucket r of table l) and M[lp, lr] = 1 where corner r has
c_rp = -1 (logsigmoid(-z) = logsigmoid(z) - z). This is softmax_r(beta <u, c_r>), factorized over bits as in
hashing.py, with no reduction over a group of 2**P columns. W, G and M are zero-padded to powers of two
(LPP rows, BD / BS columns); padded features and padded rows are set to exactly zero.

Accumulation is fp32 whatever the input dtype. Products run on the tensor cores at about fp32 accuracy where
precision matters, and bf16 tiles stay bf16 in registers (fp32 copies of them spilled: compile_kernels.py):
- the hash's projection x W^T: for bf16 x, three bf16 products with W split into three bf16 parts (exact: x is
  bf16, and products of bf16 values are exact in fp32); for fp32 and fp16 x (converted), tf32x3. (A tf32
  rounding of z would move phi by about 1%.) Products with the 0/1 matrices G and M: the fp32 side as three
  bf16 parts (_dot_exact: 24 bits, half the tensor-core work of tf32x3). Back through W in the backward: for
  bf16 inputs two bf16 parts of the gradient times W's first two (16 bits, for a bf16 result), else tf32x3;
- value products of fp32 features or states with a bf16 tile: the fp32 side split into two bf16 parts
  (_vdot, about 16 mantissa bits, finer than tf32); other value products take VPREC on fp32 operands: "tf32x3"
  for fp32 inputs, "tf32" for bf16/fp16 inputs, whose own rounding is coarser. fp16 tiles are converted: with
  fp16's 5-bit exponent the low part of a split underflows for small features (tested: errors 10x larger).
Triton's interpreter computes every product in fp32 (bf16 dots in fp32 too, see _dot16), so the CPU tests check
the algebra, the bf16 splits included; the tensor-core roundings are checked when the same tests run on a GPU.

Lengths are not specialized on (do_not_specialize): one compiled kernel serves every T.

Causal kernels walk their token range in chunks of C: exact (masked C x C scores) inside a chunk, state
(A [S], KV [S, D]) carried in registers from chunk to chunk, starting from the state entering the range
(computed by state_kernel and prefix-summed on the host). Their backward is two walks: causal_dq_kernel
forwards (dq, and each range's gradient of its entering state), causal_dkv_kernel backwards (dk, dv).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# The hash's products with W for fp32 and fp16 inputs: tf32x3 splits each fp32 operand into two tf32 parts on the
# tensor cores, about fp32 accuracy. ("ieee" fp32 products are FMAs on fp32 copies of the tile: twice the
# machine instructions and spilled registers, compile_kernels.py.)
HPREC = tl.constexpr("tf32x3")
# Triton's interpreter multiplies the bit patterns of bfloat16 dot operands (triton-lang/triton#11584): there, _dot16
# multiplies the same values in fp32 (bf16 x bf16 products are exact in fp32, so the values agree).
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _features(x, hp, beta, valid, svalid):
    """x [R, BD] (the input dtype) -> (u [R, LPP], phi [R, BS]) in fp32; rows not `valid` and features not
    `svalid` are zero. hp: the hash parameters of _hash_params."""
    u = _tanh(_proj(x, hp))
    z = (2.0 * beta) * u
    ls = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))  # logsigmoid(z), stable for any z
    logphi = _dot_exact(ls, hp[1]) - _dot_exact(z, hp[2])
    phi = tl.where(valid[:, None] & svalid[None, :], tl.exp(logphi), 0.0)
    return u, phi


@triton.jit
def _proj(x, hp):
    """x W^T in fp32. A bf16 x is exact in bf16, and W is the sum of three bf16 parts (hp[3:6]), so three
    tensor-core products of bf16 operands give it at fp32 accuracy, with x held at half the registers of an
    fp32 copy; fp32 and fp16 x take tf32x3."""
    if x.dtype != tl.bfloat16:
        xw = tl.dot(x.to(tl.float32), tl.trans(hp[0]), input_precision=HPREC)
    else:
        xw = _dot16(x, tl.trans(hp[3])) + _dot16(x, tl.trans(hp[4])) + _dot16(x, tl.trans(hp[5]))
    return xw


@triton.jit
def _dot16(a, b):
    """a @ b for bf16 a and b, accumulated in fp32."""
    if INTERPRETING:  # noqa: SIM108 (a static if: Triton compiles one branch)
        ab = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        ab = tl.dot(a, b)
    return ab


@triton.jit
def _dot_exact(a, g):
    """a @ g for fp32 a and a matrix g of 0s and 1s (the hash's G and M): a as the sum of three bf16 parts
    (24 bits, as fp32 holds), each multiplied by g exactly on the tensor cores."""
    gb = g.to(tl.bfloat16)
    hi = a.to(tl.bfloat16)
    rest = a - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return _dot16(hi, gb) + _dot16(mid, gb) + _dot16(lo, gb)


@triton.jit
def _vdot(a, b, VPREC: tl.constexpr):
    """a @ b for fp32 operands (features, gradients, states) and tiles in the input dtype, in any pairing. Two
    bf16 tiles multiply directly (exact products); with one bf16 tile the fp32 side is split into two bf16 parts
    (about 16 mantissa bits, finer than tf32), so the tile stays bf16 in registers and both products run at the
    bf16 rate; anything else multiplies in fp32 at VPREC."""
    if a.dtype == tl.bfloat16 and b.dtype == tl.bfloat16:
        ab = _dot16(a, b)
    elif a.dtype == tl.float32 and b.dtype == tl.bfloat16:
        hi = a.to(b.dtype)
        ab = _dot16(hi, b) + _dot16((a - hi.to(tl.float32)).to(b.dtype), b)
    elif a.dtype == tl.bfloat16 and b.dtype == tl.float32:
        hi = b.to(a.dtype)
        ab = _dot16(a, hi) + _dot16(a, (b - hi.to(tl.float32)).to(a.dtype))
    else:
        ab = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=VPREC)
    return ab


@triton.jit
def _features_vjp(u, phi, dphi, hp, beta):
    """The gradient with respect to x of <phi(x), dphi>, from u and phi of _features: [R, BD] fp32. For bf16
    inputs (W's parts hp[3:6] are bf16 then) the last product, back through W, takes bf16 parts: dh's two and
    W's first two, about 16 bits, far finer than the bf16 gradient it becomes; otherwise tf32x3."""
    gphi = dphi * phi  # d log phi
    z = (2.0 * beta) * u
    dz = tl.sigmoid(-z) * _dot_exact(gphi, tl.trans(hp[1])) - _dot_exact(gphi, tl.trans(hp[2]))
    dh = (2.0 * beta) * dz * (1.0 - u * u)
    if hp[3].dtype == tl.bfloat16:  # dh's two parts times W's first (_vdot), dh's first times W's second
        dx = _vdot(dh, hp[3], HPREC) + _dot16(dh.to(tl.bfloat16), hp[4])
    else:
        dx = tl.dot(dh, hp[0], input_precision=HPREC)
    return dx


@triton.jit
def _hash_params(W, WP, G, M, BD: tl.constexpr, BS: tl.constexpr, LPP: tl.constexpr):
    """(w fp32, g, m, and w's three bf16 parts) as _features takes them; WP [3, LPP, BD]."""
    rl = tl.arange(0, LPP)
    rd = tl.arange(0, BD)
    rs = tl.arange(0, BS)
    wo = rl[:, None] * BD + rd[None, :]
    go = rl[:, None] * BS + rs[None, :]
    return (tl.load(W + wo), tl.load(G + go), tl.load(M + go),
            tl.load(WP + wo), tl.load(WP + LPP * BD + wo), tl.load(WP + 2 * LPP * BD + wo))


@triton.jit
def _row_offsets(n, rows, rd, sn, st, sd):
    return n.to(tl.int64) * sn + rows.to(tl.int64)[:, None] * st + rd[None, :] * sd


@triton.jit
def _load_rows(X, n, rows, rd, T, D, sn, st, sd):
    """Rows `rows` of head n of X [N, T, D], [len(rows), BD] in X's dtype (converted to fp32 where used: a
    bf16 tile held in registers takes half the room), zero outside T x D."""
    mask = (rows[:, None] < T) & (rd[None, :] < D)
    return tl.load(X + _row_offsets(n, rows, rd, sn, st, sd), mask=mask, other=0.0)


@triton.jit
def _store_rows(X, n, rows, rd, T, D, sn, st, sd, val):
    mask = (rows[:, None] < T) & (rd[None, :] < D)
    tl.store(X + _row_offsets(n, rows, rd, sn, st, sd), val.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _load_state(A, KV, idx, rs, rd, S, D):
    """A [.., S] and KV [.., S, D] (contiguous fp32) at flat index idx, zero-padded to [BS] and [BS, BD]."""
    a = tl.load(A + idx * S + rs, mask=rs < S, other=0.0)
    kv = tl.load(KV + idx * S * D + rs[:, None] * D + rd[None, :], mask=(rs[:, None] < S) & (rd[None, :] < D),
                 other=0.0)
    return a, kv


@triton.jit
def _store_state(A, KV, idx, rs, rd, S, D, a, kv):
    tl.store(A + idx * S + rs, a, mask=rs < S)
    tl.store(KV + idx * S * D + rs[:, None] * D + rd[None, :], kv, mask=(rs[:, None] < S) & (rd[None, :] < D))


@triton.jit
def _advance(a, kv, fk, v, VPREC: tl.constexpr):
    """The state after one more chunk of keys and values."""
    return a + tl.sum(fk, 0), kv + _vdot(tl.trans(fk), v, VPREC)


@triton.jit(do_not_specialize=["T", "span"])
def state_kernel(K, V, W, WP, G, M, A_out, KV_out, T, D, S, span, beta, skn, skt, skd, svn, svt, svd,
                 BT: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, LPP: tl.constexpr, VPREC: tl.constexpr):
    """A_out[n, p] = sum phi(k_j), KV_out[n, p] = sum phi(k_j) v_j^T over the keys of range p (span tokens)."""
    p, n = tl.program_id(0), tl.program_id(1)
    rd, rs, rt = tl.arange(0, BD), tl.arange(0, BS), tl.arange(0, BT)
    hp = _hash_params(W, WP, G, M, BD, BS, LPP)
    a = tl.zeros([BS], tl.float32)
    kv = tl.zeros([BS, BD], tl.float32)
    for i in range(0, span, BT):
        rows = p * span + i + rt
        k = _load_rows(K, n, rows, rd, T, D, skn, skt, skd)
        v = _load_rows(V, n, rows, rd, T, D, svn, svt, svd)
        _, phi = _features(k, hp, beta, rows < T, rs < S)
        a, kv = _advance(a, kv, phi, v, VPREC)
    _store_state(A_out, KV_out, n * tl.num_programs(0) + p, rs, rd, S, D, a, kv)


# ----------------------------------------------------------------------------- non-causal


@triton.jit(do_not_specialize=["T", "span"])
def out_kernel(Q, O, W, WP, G, M, A, Z, T, D, S, span, beta, eps, sqn, sqt, sqd, son, sot, sod,
               PAPER: tl.constexpr, WALK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
               LPP: tl.constexpr, VPREC: tl.constexpr):
    """o = phi(q) Z, divided by phi(q) . A + eps for the paper normalization (Z = KV there, KV / (A + eps) for
    the bucket one), over tile p, or with WALK over range p (span tokens, the state loaded once). WALK is a
    compile-time choice: a loop costs registers that one tile does not (compile_kernels.py)."""
    p, n = tl.program_id(0), tl.program_id(1)
    rd, rs, rt = tl.arange(0, BD), tl.arange(0, BS), tl.arange(0, BT)
    hp = _hash_params(W, WP, G, M, BD, BS, LPP)
    a, z = _load_state(A, Z, n, rs, rd, S, D)
    for i in range(0, span if WALK else BT, BT):  # without WALK a constant single trip: no loop is compiled
        rows = p * span + i + rt  # span = BT without WALK
        _, phi = _features(_load_rows(Q, n, rows, rd, T, D, sqn, sqt, sqd), hp, beta, rows < T, rs < S)
        o = tl.dot(phi, z, input_precision=VPREC)
        if PAPER:
            o = o * (1.0 / (tl.sum(phi * a[None, :], 1) + eps))[:, None]  # one division per row
        _store_rows(O, n, rows, rd, T, D, son, sot, sod, o)


@triton.jit(do_not_specialize=["T", "span"])
def dq_kernel(Q, DO, DQ, W, WP, G, M, A, Z, dA_out, dZ_out, T, D, S, span, beta, eps,
              sqn, sqt, sqd, sgn, sgt, sgd, sdn, sdt, sdd,
              PAPER: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, LPP: tl.constexpr,
              VPREC: tl.constexpr):
    """dq of range p, and its share of the state's gradient: (dA, dKV) for the paper normalization, the
    gradient of Z = KV / (A + eps) for the bucket one (the host turns it into dA, dKV)."""
    p, n = tl.program_id(0), tl.program_id(1)
    rd, rs, rt = tl.arange(0, BD), tl.arange(0, BS), tl.arange(0, BT)
    hp = _hash_params(W, WP, G, M, BD, BS, LPP)
    a, z = _load_state(A, Z, n, rs, rd, S, D)
    da = tl.zeros([BS], tl.float32)
    dz = tl.zeros([BS, BD], tl.float32)
    for i in range(0, span, BT):
        rows = p * span + i + rt
        gr = _load_rows(DO, n, rows, rd, T, D, sgn, sgt, sgd)
        u, phi = _features(_load_rows(Q, n, rows, rd, T, D, sqn, sqt, sqd), hp, beta, rows < T, rs < S)
        gz = _vdot(gr, tl.trans(z), VPREC)  # [BT, BS]
        if PAPER:
            den = tl.sum(phi * a[None, :], 1) + eps
            rden = 1.0 / den
            wt = tl.sum(phi * gz, 1) * rden * rden
            dphi = gz * rden[:, None] - a[None, :] * wt[:, None]
            dz += _vdot(tl.trans(phi * rden[:, None]), gr, VPREC)
            da -= tl.sum(phi * wt[:, None], 0)
        else:
            dphi = gz
            dz += _vdot(tl.trans(phi), gr, VPREC)
        _store_rows(DQ, n, rows, rd, T, D, sdn, sdt, sdd, _features_vjp(u, phi, dphi, hp, beta))
    _store_state(dA_out, dZ_out, n * tl.num_programs(0) + p, rs, rd, S, D, da, dz)


@triton.jit(do_not_specialize=["T", "span"])
def dkv_kernel(K, V, DK, DV, W, WP, G, M, dA, dKV, T, D, S, span, beta, skn, skt, skd, svn, svt, svd,
               sdn, sdt, sdd, WALK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
               LPP: tl.constexpr, VPREC: tl.constexpr):
    """dk, dv over tile p, or with WALK range p (as in out_kernel), from the state's gradient (dA [S],
    dKV [S, D]); dk, dv share strides."""
    p, n = tl.program_id(0), tl.program_id(1)
    rd, rs, rt = tl.arange(0, BD), tl.arange(0, BS), tl.arange(0, BT)
    hp = _hash_params(W, WP, G, M, BD, BS, LPP)
    da, dkv = _load_state(dA, dKV, n, rs, rd, S, D)
    for i in range(0, span if WALK else BT, BT):  # as in out_kernel
        rows = p * span + i + rt
        v = _load_rows(V, n, rows, rd, T, D, svn, svt, svd)
        u, phi = _features(_load_rows(K, n, rows, rd, T, D, skn, skt, skd), hp, beta, rows < T, rs < S)
        dphi = da[None, :] + _vdot(v, tl.trans(dkv), VPREC)
        _store_rows(DV, n, rows, rd, T, D, sdn, sdt, sdd, tl.dot(phi, dkv, input_precision=VPREC))
        _store_rows(DK, n, rows, rd, T, D, sdn, sdt, sdd, _features_vjp(u, phi, dphi, hp, beta))


# ----------------------------------------------------------------------------- causal


@triton.jit(do_not_specialize=["T", "span"])
def causal_fwd_kernel(Q, K, V, O, DEN, W, WP, G, M, A0, KV0, T, D, S, span, beta, eps, sn, st, sd,
                      PAPER: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
                      LPP: tl.constexpr, VPREC: tl.constexpr):
    """o over range p, from the state entering it (A0, KV0 [N, ranges, ..]); DEN [N, T] keeps the paper
    normalization's denominators for the backward. q, k, v, o share strides."""
    p, n = tl.program_id(0), tl.program_id(1)
    rd, rs, rc = tl.arange(0, BD), tl.arange(0, BS), tl.arange(0, C)
    causal = rc[:, None] >= rc[None, :]
    hp = _hash_params(W, WP, G, M, BD, BS, LPP)
    a, kv = _load_state(A0, KV0, n * tl.num_programs(0) + p, rs, rd, S, D)
    for i in range(0, span, C):
        rows = p * span + i + rc
        valid = rows < T
        v = _load_rows(V, n, rows, rd, T, D, sn, st, sd)
        _, fq = _features(_load_rows(Q, n, rows, rd, T, D, sn, st, sd), hp, beta, valid, rs < S)
        _, fk = _features(_load_rows(K, n, rows, rd, T, D, sn, st, sd), hp, beta, valid, rs < S)
        if PAPER:
            scores = tl.where(causal, tl.dot(fq, tl.trans(fk), input_precision=VPREC), 0.0)
            den = tl.sum(fq * a[None, :], 1) + tl.sum(scores, 1) + eps
            o = (tl.dot(fq, kv, input_precision=VPREC) + _vdot(scores, v, VPREC)) * (1.0 / den)[:, None]
            tl.store(DEN + n * T + rows, den, mask=valid)
        else:
            qf = fq / (a[None, :] + tl.cumsum(fk, 0) + eps)  # A_t sums the keys j <= t
            scores = tl.where(causal, tl.dot(qf, tl.trans(fk), input_precision=VPREC), 0.0)
            o = tl.dot(qf, kv, input_precision=VPREC) + _vdot(scores, v, VPREC)
        _store_rows(O, n, rows, rd, T, D, sn, st, sd, o)
        a, kv = _advance(a, kv, fk, v, VPREC)


@triton.jit
def _load_den(DEN, n, rows, valid, T, PAPER: tl.constexpr, C: tl.constexpr):
    if PAPER:  # noqa: SIM108 (a static if: Triton compiles one branch)
        den = tl.load(DEN + n * T + rows, mask=valid, other=1.0)
    else:
        den = tl.zeros([C], tl.float32)
    return den


@triton.jit
def _load_chunk(Q, K, V, O, DO, DEN, hp, beta, n, rows, rd, rs, T, D, S, sn, st, sd, sgn, sgt, sgd,
                PAPER: tl.constexpr, C: tl.constexpr):
    """What both backward walks read of one chunk: v, dO, (u, phi) of q and of k, o and the denominators (the
    tiles v, dO, o in the input dtype)."""
    valid = rows < T
    v = _load_rows(V, n, rows, rd, T, D, sn, st, sd)
    gr = _load_rows(DO, n, rows, rd, T, D, sgn, sgt, sgd)
    uq, fq = _features(_load_rows(Q, n, rows, rd, T, D, sn, st, sd), hp, beta, valid, rs < S)
    uk, fk = _features(_load_rows(K, n, rows, rd, T, D, sn, st, sd), hp, beta, valid, rs < S)
    o = _load_rows(O, n, rows, rd, T, D, sn, st, sd)
    return v, gr, uq, fq, uk, fk, o, _load_den(DEN, n, rows, valid, T, PAPER, C)


@triton.jit
def _causal_chunk_grads(fq, fk, v, gr, o, den, a, kv, causal, eps, PAPER: tl.constexpr, VPREC: tl.constexpr):
    """The gradient pieces of one chunk shared by both backward walks; v, gr (dO), o are tiles in the input dtype.

    Returns (dfq: gradient of phi(q), dS: gradient of the masked scores, qf: the query features the
    scores use, qs: the same over each query's denominator (what multiplies dO into the state's and the values'
    gradients; qf for the bucket normalization), dst_kv [BS, BD] and dst_a [BS]: this chunk's queries' gradient
    of the state entering the chunk, da_t [C, BS]: its rows sum to dst_a; for the bucket normalization row t is
    the gradient of A_t, which the keys j <= t of the chunk also receive)."""
    if PAPER:  # o = num / den: the gradient of num is dO / den, of den -dO.o / den
        rden = 1.0 / den
        dden = -tl.sum(gr.to(tl.float32) * o.to(tl.float32), 1) * rden
        dS = tl.where(causal, _vdot(gr, tl.trans(v), VPREC) * rden[:, None] + dden[:, None], 0.0)
        dfq = _vdot(gr, tl.trans(kv), VPREC) * rden[:, None] + dden[:, None] * a[None, :] \
            + tl.dot(dS, fk, input_precision=VPREC)
        qf = fq
        qs = fq * rden[:, None]
        da_t = fq * dden[:, None]
    else:
        a_eps = a[None, :] + tl.cumsum(fk, 0) + eps
        qf = fq / a_eps
        qs = qf
        dS = tl.where(causal, _vdot(gr, tl.trans(v), VPREC), 0.0)
        dqf = _vdot(gr, tl.trans(kv), VPREC) + tl.dot(dS, fk, input_precision=VPREC)
        dfq = dqf / a_eps
        da_t = -(dqf * qf) / a_eps
    dst_kv = _vdot(tl.trans(qs), gr, VPREC)
    return dfq, dS, qf, qs, dst_kv, tl.sum(da_t, 0), da_t


@triton.jit(do_not_specialize=["T", "span"])
def causal_dq_kernel(Q, K, V, O, DO, DQ, DEN, W, WP, G, M, A0, KV0, dA_out, dKV_out, T, D, S, span, beta, eps,
                     sn, st, sd, sgn, sgt, sgd, PAPER: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                     BS: tl.constexpr, LPP: tl.constexpr, VPREC: tl.constexpr):
    """First backward walk (forward order): dq over range p, and the range's total gradient of the state
    entering it (dA_out, dKV_out [N, ranges, ..]), which the host suffix-sums for the second walk.
    q, k, v, o, dq share strides; do has its own."""
    p, n = tl.program_id(0), tl.program_id(1)
    rd, rs, rc = tl.arange(0, BD), tl.arange(0, BS), tl.arange(0, C)
    causal = rc[:, None] >= rc[None, :]
    hp = _hash_params(W, WP, G, M, BD, BS, LPP)
    idx = n * tl.num_programs(0) + p
    a, kv = _load_state(A0, KV0, idx, rs, rd, S, D)
    tot_a = tl.zeros([BS], tl.float32)
    tot_kv = tl.zeros([BS, BD], tl.float32)
    for i in range(0, span, C):
        rows = p * span + i + rc
        v, gr, uq, fq, _, fk, o, den = _load_chunk(Q, K, V, O, DO, DEN, hp, beta, n, rows, rd, rs, T, D, S,
                                                   sn, st, sd, sgn, sgt, sgd, PAPER, C)
        dfq, _, _, _, dst_kv, dst_a, _ = _causal_chunk_grads(fq, fk, v, gr, o, den, a, kv, causal, eps, PAPER,
                                                             VPREC)
        _store_rows(DQ, n, rows, rd, T, D, sn, st, sd, _features_vjp(uq, fq, dfq, hp, beta))
        tot_kv += dst_kv
        tot_a += dst_a
        a, kv = _advance(a, kv, fk, v, VPREC)
    _store_state(dA_out, dKV_out, idx, rs, rd, S, D, tot_a, tot_kv)


@triton.jit(do_not_specialize=["T", "span", "n_chunks", "items", "n_ranges"])
def causal_dkv_kernel(Q, K, V, O, DO, DK, DV, DEN, W, WP, G, M, A0, KV0, dA_after, dKV_after, SA, SKV, T, D, S, span,
                      n_chunks, items, n_ranges, beta, eps, sn, st, sd, sgn, sgt, sgd, PAPER: tl.constexpr,
                      C: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, LPP: tl.constexpr, VPREC: tl.constexpr):
    """Second backward walk: dk, dv, range by range (a persistent grid: each program takes ranges
    pid, pid + programs, ...), each range walked in reverse chunk order.

    (dA_after, dKV_after) is the gradient of the state leaving a range from every later query. Walking
    backwards, each chunk's own share is added after its keys are done, so the gradient from later queries
    is a sum, never a difference: the share of a query with a tiny denominator can be 1e6 times larger than
    the rest, and subtracting it from a total would leave only rounding error. The bucket normalization
    also needs the forward state at each chunk: a forward sub-walk writes them to this program's scratch
    rows (SA [programs, n_chunks, BS], SKV [programs, n_chunks, BS, BD]), so scratch is bounded by the
    grid, not by T."""
    pid = tl.program_id(0)
    rd, rs, rc = tl.arange(0, BD), tl.arange(0, BS), tl.arange(0, C)
    causal = rc[:, None] >= rc[None, :]
    hp = _hash_params(W, WP, G, M, BD, BS, LPP)
    for item in range(pid, items, tl.num_programs(0)):
        n, p = item // n_ranges, item % n_ranges
        a = tl.zeros([BS], tl.float32)
        kv = tl.zeros([BS, BD], tl.float32)
        if not PAPER:
            tl.debug_barrier()  # the previous range's reads of scratch are done
            a, kv = _load_state(A0, KV0, item, rs, rd, S, D)
            for c in range(0, n_chunks):
                rows = p * span + c * C + rc
                tl.store(SA + (pid * n_chunks + c) * BS + rs, a)
                tl.store(SKV + (pid * n_chunks + c) * BS * BD + rs[:, None] * BD + rd[None, :], kv)
                v = _load_rows(V, n, rows, rd, T, D, sn, st, sd)
                _, fk = _features(_load_rows(K, n, rows, rd, T, D, sn, st, sd), hp, beta, rows < T, rs < S)
                a, kv = _advance(a, kv, fk, v, VPREC)
            tl.debug_barrier()  # scratch written by all threads before any reads it
        later_a, later_kv = _load_state(dA_after, dKV_after, item, rs, rd, S, D)
        for j in range(0, n_chunks):
            c = n_chunks - 1 - j
            rows = p * span + c * C + rc
            if not PAPER:
                a = tl.load(SA + (pid * n_chunks + c) * BS + rs)
                kv = tl.load(SKV + (pid * n_chunks + c) * BS * BD + rs[:, None] * BD + rd[None, :])
            v, gr, _, fq, uk, fk, o, den = _load_chunk(Q, K, V, O, DO, DEN, hp, beta, n, rows, rd, rs, T, D,
                                                       S, sn, st, sd, sgn, sgt, sgd, PAPER, C)
            _, dS, qf, qs, dst_kv, dst_a, da_t = _causal_chunk_grads(fq, fk, v, gr, o, den, a, kv, causal, eps,
                                                                     PAPER, VPREC)
            dfk = tl.dot(tl.trans(dS), qf, input_precision=VPREC) + later_a[None, :] \
                + _vdot(v, tl.trans(later_kv), VPREC)
            if not PAPER:
                dfk += tl.cumsum(da_t, 0, reverse=True)  # key j feeds A_t for every t >= j in the chunk
            weights = tl.where(causal, tl.dot(qs, tl.trans(fk), input_precision=VPREC), 0.0)  # [query, key]
            dv = _vdot(tl.trans(weights), gr, VPREC) + tl.dot(fk, later_kv, input_precision=VPREC)
            _store_rows(DV, n, rows, rd, T, D, sn, st, sd, dv)
            _store_rows(DK, n, rows, rd, T, D, sn, st, sd, _features_vjp(uk, fk, dfk, hp, beta))
            later_kv += dst_kv
            later_a += dst_a


# ----------------------------------------------------------------------------- decode


@triton.jit
def decode_step_kernel(Q, K, V, O, W, WP, G, M, A, KV, D, S, beta, eps, sqn, sqd, skn, skd, svn, svd, son, sod,
                       PAPER: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, LPP: tl.constexpr,
                       VPREC: tl.constexpr):
    """One decoded token of head n (program n), q, k, v, o [N, D]: phi(k) and phi(k) v^T added to the head's state
    A [N, S], KV [N, S, D] (fp32, in place), then o = phi(q) KV / (phi(q) . A + eps) (paper) or
    (phi(q) / (A + eps)) KV (bucket). The token is row 0 of a tile of 16 rows, the fewest a tensor-core product
    takes; the other rows are zero and never stored. One launch per token for every head: the PyTorch step is
    some forty operations, about fifteen of them kernels."""
    n = tl.program_id(0)
    rd, rs, rt = tl.arange(0, BD), tl.arange(0, BS), tl.arange(0, 16)
    one, svalid = rt < 1, rs < S
    hp = _hash_params(W, WP, G, M, BD, BS, LPP)
    a, kv = _load_state(A, KV, n, rs, rd, S, D)
    _, fk = _features(_load_rows(K, n, rt, rd, 1, D, skn, 0, skd), hp, beta, one, svalid)
    a, kv = _advance(a, kv, fk, _load_rows(V, n, rt, rd, 1, D, svn, 0, svd), VPREC)
    _store_state(A, KV, n, rs, rd, S, D, a, kv)
    _, fq = _features(_load_rows(Q, n, rt, rd, 1, D, sqn, 0, sqd), hp, beta, one, svalid)
    if PAPER:
        o = tl.dot(fq, kv, input_precision=VPREC) * (1.0 / (tl.sum(fq * a[None, :], 1) + eps))[:, None]
    else:
        o = tl.dot(fq / (a + eps)[None, :], kv, input_precision=VPREC)
    _store_rows(O, n, rt, rd, 1, D, son, 0, sod, o)
