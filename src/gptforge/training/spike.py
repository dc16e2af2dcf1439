"""Loss-spike guard: skip an update whose loss or grad norm jumps far above recent history.

Keeps the last `window` accepted (loss, grad norm) pairs. A step is a spike when either value is
non-finite or exceeds mean + k * std of that history (once at least `window // 2` steps are
known). The trainer skips spiking updates and, after `max_skips` in a row, rolls back to the last
checkpoint with a smaller learning rate. Its state travels in checkpoints for exact resume.
The trainer reads each step's loss and grad norm before its update while the guard is on.
"""

from __future__ import annotations

import math
from collections import deque


class SpikeGuard:
    def __init__(self, k: float = 6.0, window: int = 50, max_skips: int = 3):
        self.k, self.window, self.max_skips = k, window, max_skips
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.skipped_total = 0

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
        reason = self.is_spike(loss, grad_norm)
        if reason is not None:
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
