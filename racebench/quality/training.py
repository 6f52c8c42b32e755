"""What trains a quality model, declared once: the run's spec (QualitySpec) and one model's training (TrainConfig)
both extend it. Free of torch, so the CLI builds and checks a spec without importing it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Training:
    steps: int = 350
    batch: int = 32
    lr: float = 1e-2
    d_model: int = 64
    layers: int = 2
    heads: int = 1
    vocab: int = 64  # 31 keys, 32 values: up to 31 pairs
    seed: int = 0
    knobs: dict = field(default_factory=dict)
    device: str = "cpu"

    def training(self) -> dict:
        """The training fields and their values, to build the other kind from this one."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Training)}
