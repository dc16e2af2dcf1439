"""Loss-spike guard: skip an update whose loss or grad norm jumps far above recent history.

Keeps the last `window` accepted (loss, grad norm) pairs. A step is a spike when either value is
non-finite or exceeds mean + k * std of that history (once at least `window // 2` steps are
known). The trainer skips spiking updates and, after `max_skips` in a row, rolls back to the last
checkpoint with a smaller learning rate. Its state travels in checkpoints for exact resume.

Two copies of the same statistics: on the device, `decide` judges each step as it is queued, so
the host need not read the loss before the update (the verdict masks the optimizer step, see
trainer.step_unless); on the host, `record` replays the steps when the trainer reads them (the
reason printed, the counts, the checkpointed state). The device's verdict is the one that counts:
`record` follows it, so both copies hold the same history even where a value sits exactly at the
limit and the two sums round differently.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class SpikeGuard:
    def __init__(self, k: float = 6.0, window: int = 50, max_skips: int = 3):
        self.k, self.window, self.max_skips = k, window, max_skips
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.skipped_total = 0
        self._device: _DeviceStats | None = None  # built from the host state when first needed

    # ------------------------------------------------------------------ host
    def _limit(self, values) -> float:
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
        return mean + self.k * max(std, 1e-3 * abs(mean), 1e-8)

    def is_spike(self, loss: float, grad_norm: float) -> str | None:
        """Why this step is a spike ("loss 7.1 > limit 4.9"), or None if it is fine."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"grad norm is {grad_norm}"
        if len(self.losses) < self.min_history:
            return None
        for name, value, hist in (("loss", loss, self.losses), ("grad norm", grad_norm, self.norms)):
            limit = self._limit(hist)
            if value > limit:
                return f"{name} {value:.4g} > mean + {self.k:g} std = {limit:.4g}"
        return None

    @property
    def min_history(self) -> int:
        return max(2, self.window // 2)

    def observe(self, loss: float, grad_norm: float) -> str | None:
        """Record a step; return the reason to skip it, or None (then it joins the history)."""
        return self.record(loss, grad_norm, skipped=self.is_spike(loss, grad_norm) is not None)

    def record(self, loss: float, grad_norm: float, skipped: bool) -> str | None:
        """Record a step the device has judged (`decide`): the reason it was skipped, or None."""
        reason = None
        if skipped:
            reason = self.is_spike(loss, grad_norm) or "loss and grad norm at the limit (rounding)"
            self.consecutive += 1
            self.skipped_total += 1
        else:
            self.consecutive = 0
            self.losses.append(loss)
            self.norms.append(grad_norm)
        return reason

    @property
    def must_roll_back(self) -> bool:
        return self.consecutive >= self.max_skips

    def reset_streak(self, skipped_total: int) -> None:
        """After a rollback: the streak is over, the count of skips goes on."""
        self.consecutive, self.skipped_total = 0, skipped_total
        self._device = None

    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "norms": list(self.norms),
            "consecutive": self.consecutive,
            "skipped_total": self.skipped_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.norms = deque(state["norms"], maxlen=self.window)
        self.consecutive = int(state["consecutive"])
        self.skipped_total = int(state["skipped_total"])
        self._device = None

    # ------------------------------------------------------------------ device
    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Judge a step on the device, without a sync: (skip, halted) as 0-dim bool tensors.

        `halted` says an earlier step already ended a streak of max_skips spikes: then this step
        is skipped too and counts for nothing; the host, when it reads that streak, rolls back and
        drops the steps queued behind it. Call in step order; the host state must be caught up
        (no step judged but not yet recorded) when it is changed or loaded."""
        if self._device is None or self._device.hist.device != loss.device:
            self._device = _DeviceStats.of(self, loss.device)
        return self._device.decide(loss, grad_norm, self.k, self.min_history, self.max_skips)


class _DeviceStats:
    """The guard's history as tensors: hist (2, window) holds loss and grad norm of the last n
    accepted steps in its last n columns, oldest first."""

    def __init__(self, hist: torch.Tensor, n: torch.Tensor, consecutive: torch.Tensor, halted: torch.Tensor):
        self.hist, self.n, self.consecutive, self.halted = hist, n, consecutive, halted

    @classmethod
    def of(cls, guard: SpikeGuard, device: torch.device) -> "_DeviceStats":
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        n = len(guard.losses)
        hist = torch.zeros(2, guard.window, dtype=dtype)
        if n:
            hist[:, guard.window - n:] = torch.tensor([list(guard.losses), list(guard.norms)], dtype=dtype)
        as_tensor = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        return cls(hist.to(device), as_tensor(n, torch.int64), as_tensor(guard.consecutive, torch.int64),
                   as_tensor(guard.must_roll_back, torch.bool))

    def decide(self, loss, grad_norm, k: float, min_history: int, max_skips: int):
        window = self.hist.shape[1]
        value = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())]).to(self.hist.dtype)
        valid = torch.arange(window, device=self.hist.device) >= window - self.n  # (window,)
        n = self.n.to(self.hist.dtype)
        mean = torch.where(valid, self.hist, 0).sum(1) / n.clamp(min=1)  # (2,)
        var = torch.where(valid, (self.hist - mean[:, None]) ** 2, 0).sum(1) / (n - 1).clamp(min=1)
        spread = torch.maximum(torch.maximum(var.sqrt(), 1e-3 * mean.abs()), torch.full_like(mean, 1e-8))
        over = (self.n >= min_history) & (value > mean + k * spread).any()
        spike = ~torch.isfinite(value).all() | over
        halted = self.halted
        skip = spike | halted
        accept = ~skip
        self.hist = torch.where(accept, torch.cat([self.hist[:, 1:], value[:, None]], dim=1), self.hist)
        self.n = torch.where(accept, (self.n + 1).clamp(max=window), self.n)
        self.consecutive = torch.where(halted, self.consecutive, torch.where(spike, self.consecutive + 1, 0))
        self.halted = halted | (self.consecutive >= max_skips)
        return skip, halted
