"""Training one TinyLM on MQAR with one attention method, and scoring it on held-out sequences."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from racebench.quality.model import TinyLM, loss_and_accuracy
from racebench.quality.mqar import max_pairs, mqar
from racebench.quality.training import Training

HELD_OUT_SEED = 10**9  # held-out sequences draw from seeds no training batch uses (those are below 10^9)


@dataclass(frozen=True)
class TrainConfig(Training):
    """One model's training: the shared fields (training.py), its length and pair counts, and its evaluations."""

    T: int
    pairs: tuple[int, ...]  # the pair counts trained on (a batch each, in turn) and scored
    eval_every: int = 50
    eval_n: int = 256  # held-out sequences per pair count, at the end
    probe_n: int = 64  # the first of them, at the evaluations every eval_every steps (the learning curve)

    def usable_pairs(self) -> tuple[int, ...]:
        return tuple(p for p in self.pairs if p <= max_pairs(self.T))


def held_out(cfg: TrainConfig, pairs: int):
    return mqar(cfg.eval_n, cfg.T, pairs, vocab=cfg.vocab, seed=HELD_OUT_SEED + 1000 * cfg.T + pairs)


def learning_rate_factor(step: int, steps: int) -> float:
    """Warm-up over the first 5% of the steps, the full rate until 80%, then a linear decay to 0: recall is learnt
    in a sudden transition that a rate decaying from the start delays past a short run's end."""
    warm, decay = max(1, steps // 20), int(0.8 * steps)
    if step < warm:
        return (step + 1) / warm
    return 1.0 if step < decay else max(0.0, (steps - step) / (steps - decay))


@torch.no_grad()
def evaluate(model: TinyLM, cfg: TrainConfig, sets: dict, n: int | None = None) -> dict[int, float]:
    """Accuracy on the first n (default: all eval_n) held-out sequences of each pair count, in whole batches (a
    method may be built for the batch size: fixed projections)."""
    n = max(cfg.batch, (n or cfg.eval_n) // cfg.batch * cfg.batch)
    model.eval()
    out = {}
    for pairs, data in sets.items():
        correct, seen = 0.0, 0
        for start in range(0, min(n, data.inputs.shape[0]), cfg.batch):
            chunk = slice(start, start + cfg.batch)
            if data.inputs[chunk].shape[0] < cfg.batch:
                break
            inputs, labels = data.inputs[chunk].to(cfg.device), data.labels[chunk].to(cfg.device)
            _, acc = loss_and_accuracy(model(inputs), labels)
            correct, seen = correct + acc * cfg.batch, seen + cfg.batch
        out[pairs] = correct / seen
    model.train()
    return out


def train(method: str, cfg: TrainConfig, *, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train from cfg.seed and return the loss per step, the held-out accuracy per pair count every eval_every
    steps and at the end, and the seconds it took."""
    pairs = cfg.usable_pairs()
    model = TinyLM(method, vocab=cfg.vocab, T=cfg.T, batch=cfg.batch, d_model=cfg.d_model, layers=cfg.layers,
                   heads=cfg.heads, knobs=cfg.knobs, seed=cfg.seed, device=cfg.device).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: learning_rate_factor(s, cfg.steps))
    sets = {p: held_out(cfg, p) for p in pairs}
    losses, curve = [], []
    start = time.perf_counter()
    for step in range(cfg.steps):
        data = mqar(cfg.batch, cfg.T, pairs[step % len(pairs)], vocab=cfg.vocab, seed=cfg.seed * 10**6 + step)
        loss, _ = loss_and_accuracy(model(data.inputs.to(cfg.device)), data.labels.to(cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        if step + 1 == cfg.steps:
            curve.append((step + 1, evaluate(model, cfg, sets)))
        elif (step + 1) % cfg.eval_every == 0:
            curve.append((step + 1, evaluate(model, cfg, sets, cfg.probe_n)))
        if on_step:
            on_step(step + 1, losses[-1])
    return dict(losses=losses, curve=curve, final=curve[-1][1] if curve else {}, seconds=time.perf_counter() - start,
                model=model)
