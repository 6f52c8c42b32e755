"""Multi-query associative recall (MQAR, as in the Zoology benchmark), generated here from a seed.

A sequence opens with `pairs` key-value pairs (k1 v1 k2 v2 ...): keys from the lower half of the vocabulary,
values from the upper half, keys distinct. Each key is then queried once, later in the sequence, at a gap drawn
from a power law (short gaps likelier: recall over near and far distances); the other positions hold random
tokens from the values' half (so a key occurs only in its pair and its query). The model must output, at each
query, the value paired with that key: the loss and the accuracy count those positions only (labels elsewhere are
IGNORE)."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # the label of every position that is not an answer (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Batch:
    inputs: object  # LongTensor [N, T]: the tokens
    labels: object  # LongTensor [N, T]: the value expected after a query key at each query position, else IGNORE


def max_pairs(T: int) -> int:
    """The most pairs a sequence of T tokens holds: 2 tokens per pair, then room for each query at a distinct gap."""
    return T // 4


def mqar(n: int, T: int, pairs: int, *, vocab: int = 256, seed: int = 0, power_a: float = 0.01) -> Batch:
    """n sequences of T tokens with `pairs` key-value pairs each."""
    import torch

    if not 1 <= pairs <= max_pairs(T):
        raise ValueError(f"{pairs} pairs do not fit in {T} tokens (at most {max_pairs(T)})")
    half = vocab // 2
    if pairs > half - 1:
        raise ValueError(f"{pairs} distinct keys need a vocabulary over {2 * (pairs + 1)} tokens, not {vocab}")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.stack([torch.randperm(half - 1, generator=gen)[:pairs] + 1 for _ in range(n)])  # [n, pairs]
    values = torch.randint(half, vocab, (n, pairs), generator=gen)
    context = 2 * pairs
    space = (T - context) // 2  # query slots: a query and the position after it
    # P(gap = g) proportional to g^(a - 1): a power law, as Zoology draws them
    weights = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    slots = torch.stack([torch.multinomial(weights, pairs, replacement=False, generator=gen) for _ in range(n)])
    inputs = torch.randint(half, vocab, (n, T), generator=gen)  # filler: never a key, so each key occurs twice
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    labels = torch.full((n, T), IGNORE, dtype=torch.long)
    rows = torch.arange(n).unsqueeze(1)
    query_at = context + 2 * slots  # [n, pairs]
    inputs[rows, query_at] = keys
    labels[rows, query_at] = values  # predicted at the query's position: the next token is its value
    inputs[rows, query_at + 1] = values  # the answer follows (teacher forcing), as in a real sequence
    return Batch(inputs, labels)
