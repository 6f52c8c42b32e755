"""The small causal model `racebench quality` trains with each attention method swapped in: token embeddings, then
blocks of (short causal convolution, attention, MLP), pre-norm and residual, as the Zoology benchmark's models are
built. The short convolution hands each position its predecessor, so recall is the attention's work alone. No
position embeddings: recall needs no absolute position, and with learned ones the softmax model had not learnt it
after 1000 steps, where without them it had by step 166."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from racebench.methods.registry import BuildConfig, get_method


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, attend, conv: int = 3):
        super().__init__()
        self.heads, self.attend = heads, attend
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.conv = nn.Conv1d(d_model, d_model, conv, groups=d_model, padding=conv - 1)
        self.qkv, self.out = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm1(x)
        h = self.conv(h.transpose(1, 2))[..., :T].transpose(1, 2)  # causal: the padding is on the left only
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, T, D]
        o = self.attend(q.contiguous(), k.contiguous(), v.contiguous())
        x = x + self.out(o.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """`layers` blocks of `method`'s causal attention over d_model channels in `heads` heads."""

    def __init__(self, method: str, *, vocab: int, T: int, batch: int, d_model: int = 64, layers: int = 2,
                 heads: int = 1, knobs: dict | None = None, seed: int = 0, device: str = "cpu"):
        super().__init__()
        torch.manual_seed(seed)
        m = get_method(method)
        attends = []
        for layer in range(layers):  # each layer its own random planes or projections
            cfg = BuildConfig(batch, heads, T, d_model // heads, "fp32", device, True, seed + layer, knobs or {})
            m.check(cfg)
            attends.append(m.build(cfg))
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, a) for a in attends)
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def captured_qkv(self, tokens, layer: int = 0):
        """The q, k, v [B, H, T, D] the given block computes for these tokens (fidelity's `model` inputs)."""
        x = self.embed(tokens)
        for block in self.blocks[:layer]:
            x = block(x)
        block = self.blocks[layer]
        B, T, C = x.shape
        h = block.conv(block.norm1(x).transpose(1, 2))[..., :T].transpose(1, 2)
        return tuple(block.qkv(h).view(B, T, 3, block.heads, C // block.heads).permute(2, 0, 3, 1, 4))


def loss_and_accuracy(logits, labels):
    """Cross-entropy and accuracy over the answer positions only."""
    from racebench.quality.mqar import IGNORE

    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    answer = labels != IGNORE
    accuracy = (logits.argmax(-1)[answer] == labels[answer]).float().mean()
    return loss, float(accuracy)


def save_model(model: TinyLM, path, config: dict) -> None:
    """The model's weights and what rebuilds it (fidelity's `model` inputs read them back)."""
    torch.save({"config": config, "state": model.state_dict()}, path)


@functools.lru_cache(maxsize=4)
def _saved(path: str) -> dict:
    """A saved model file, read once per process (the fidelity spec checks it, then the run reads its inputs)."""
    from racebench.errors import UsageError

    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--model {path}: not a saved racebench quality model ({exc})".splitlines()[0]) from None


def model_inputs(path, H: int, D: int):
    """model_qkv(T, seed) for fidelity: the q, k, v the saved model's first attention layer computes on H fresh MQAR
    sequences (each one a head: [1, H, T, D], float64), T at most the model's length."""
    from racebench.errors import UsageError
    from racebench.quality.mqar import max_pairs, mqar

    saved = _saved(str(path))
    c = saved["config"]
    if c["d_model"] // c["heads"] != D:
        raise UsageError(f"--inputs model: the model's heads have D = {c['d_model'] // c['heads']}; give "
                         f"--head-dim {c['d_model'] // c['heads']}")
    model = TinyLM(c["method"], vocab=c["vocab"], T=c["T"], batch=c["batch"], d_model=c["d_model"],
                   layers=c["layers"], heads=c["heads"], seed=c["seed"])
    model.load_state_dict(saved["state"])
    model.eval()

    def qkv(T: int, seed: int):
        tokens = mqar(H, c["T"], min(16, max_pairs(c["T"])), vocab=c["vocab"], seed=seed).inputs
        with torch.no_grad():
            q, k, v = model.captured_qkv(tokens)  # [H sequences, heads, T, D]
        return tuple(x[:, 0, :T].unsqueeze(0).double().contiguous() for x in (q, k, v))

    return qkv, c["T"]
