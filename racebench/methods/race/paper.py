"""`race-paper`: the algorithm and data layout of the published RACE benchmark scripts (RACE.md,
"Known pitfalls"), re-implemented so our `race` has a faithful baseline to beat.

Same operations as the scripts: q, k, v packed to [M, B, T, H, D] by permute + expand, permuted back and
made contiguous (a copy only when M > 1), one projection GEMM per ensemble, tanh, a GEMM with the corner
matrix, a softmax over R, bucket normalization, and for causal inputs prefix sums of shape [N, T, S, D].
"""

from __future__ import annotations

import torch

from racebench.methods.race.hashing import corners


def race_paper(q, k, v, planes, *, beta, causal=False, eps=1e-6):
    """q, k, v [B, H, T, D]; planes [M, L, P, D] (one set of tables per ensemble)."""
    B, H, T, D = q.shape
    M, L, P, _ = planes.shape
    R, N = 2**P, M * B * H
    planes_t = planes.to(q.device, q.dtype).view(M, L * P, D).transpose(1, 2)  # [M, D, L*P]
    protos_t = corners(P, device=q.device, dtype=q.dtype).t()  # [P, R]

    def pack(z):  # [B, H, T, D] -> [M, B, T, H, D] -> [M, B*H, T, D]
        z = z.permute(0, 2, 1, 3).unsqueeze(0).expand(M, -1, -1, -1, -1)
        return z.permute(0, 1, 3, 2, 4).contiguous().view(M, B * H, T, D)

    def probs(x):  # [M, BH, T, D] -> [N, T, S]
        proj = torch.einsum("mbtd,mds->mbts", x, planes_t).contiguous().view(N, T, L, P)
        logits = (proj.tanh() * beta) @ protos_t  # [N, T, L, R]
        return torch.softmax(logits, dim=-1).contiguous().view(N, T, L * R)

    qh, kh, vh = pack(q), pack(k), pack(v).view(N, T, D)
    pq, pk = probs(qh), probs(kh)
    if causal:
        a = pk.cumsum(dim=1)  # [N, T, S]
        b = (pk.unsqueeze(-1) * vh.unsqueeze(-2)).cumsum(dim=1)  # [N, T, S, D]
        out = (pq.unsqueeze(-1) * (b / (a.unsqueeze(-1) + eps))).sum(dim=2)  # [N, T, D]
    else:
        b = pk.transpose(1, 2).bmm(vh)  # [N, S, D]
        a = pk.sum(dim=1)  # [N, S]
        out = pq.bmm(b / (a.unsqueeze(-1) + eps))  # [N, T, D]
    out = out.view(M, B, H, T, D).permute(0, 1, 3, 2, 4)  # [M, B, T, H, D]
    return out.mean(dim=0).permute(0, 2, 1, 3)  # [B, H, T, D]
