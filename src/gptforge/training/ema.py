"""An exponential moving average of the weights (optim.ema), for evaluation, samples and export.

After every optimizer step, avg <- avg + (1 - d_t) (w - avg), with d_t = min(ema, (1 + t) / (10 + t))
at step t: the ramp keeps the first steps' random weights from lingering in the average (the warmup
of timm's ModelEmaV2 and of Adam's bias correction). The average lives beside the parameters,
in their dtype and placement (a DTensor shard of each under FSDP2: the update is elementwise, so
no rank talks to another).

`applied()` puts the average into the model's parameters for the duration of a `with` (and
the training weights back after it): evaluation, the HellaSwag and task evaluations, and samples
run on the average, and a checkpoint's model.safetensors is written from it, so that everything
that reads a checkpoint (sample, evaluate, export, init_from) gets the averaged weights without
knowing about them. The training weights go into state.pt ("train_weights") for an exact resume.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

RAMP = 10  # d_t = (1 + t) / (RAMP + t) until it reaches the configured decay


def decay_at(decay: float, step: int) -> float:
    """The decay used after optimizer step `step` (from 0)."""
    return min(decay, (1 + step) / (RAMP + step))


class WeightAverage:
    """The EMA of a model's parameters (see the module doc)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.avg = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the parameters after optimizer step `step` into the average."""
        torch._foreach_lerp_(self.avg, [p.detach() for p in self.params], 1.0 - decay_at(self.decay, step))

    @torch.no_grad()
    def reset(self) -> None:
        """The average := the current parameters (after weights were loaded into the model)."""
        for a, p in zip(self.avg, self.params):
            a.copy_(p.detach())

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's parameters inside the block, the training weights after."""
        with torch.no_grad():
            kept = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)
