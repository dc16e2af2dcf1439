"""The run's clock: run.max_minutes as the horizon of the learning-rate schedule.

With a time budget the schedule's progress is elapsed wall time, not steps (optim.lr_at's
`progress`): warmup stays in steps; WSD is flat until (1 - decay_frac) of the horizon and decays
linearly to lr * min_lr_ratio at it (cosine: the same fraction through its half cosine). The
horizon is the budget less a reserve for what follows the last step (the final evaluation,
checkpoint and sample, and the process's exit) and less one step, so the last step runs at the
floor and the command ends when the budget is spent.

What counts: a `gptforge` command is timed from its process's start (imports, data and model
setup included); `train()` called from Python from the Trainer's construction. The time spent
is saved in every checkpoint's state and a resumed run continues from it, so the budget is the
whole run's; the resumed process's own startup is counted too. The reserve's parts are the
measured costs of the run's own mid-run evaluations, samples and checkpoints, estimated from the
step time until one is measured.

Under torchrun every rank uses rank 0's progress (one small broadcast a step), so the ranks'
learning rates and their last step agree.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist

EXIT_S = 1.0  # a command's exit after the final sample: loaders, interpreter (~1 s measured on a CPU)
SAMPLE_TOKEN_S = 0.01  # seconds per sampled token until a sample is measured
CHECKPOINT_BYTES_S = 200e6  # write speed assumed until a checkpoint is measured
EVAL_COST = 1 / 3  # an evaluated token's cost relative to a trained one (forward only)


def process_start(pid: int | str = "self") -> float | None:
    """When process `pid` began, as a time.time() value (from Linux's /proc), else None."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def command_start() -> tuple[float, float]:
    """When the command began and the seconds its exit takes: the process's start and EXIT_S for
    the gptforge CLI (the `gptforge` script, `python -m gptforge`; under torchrun, `-m gptforge`'s
    workers count from the launcher's start, their parent's), else now and 0 (train() called from
    Python, which goes on after it)."""
    prog = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    cli = prog.name == "gptforge" or prog.parts[-2:] == ("gptforge", "__main__.py")
    started = process_start(os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else "self") if cli else None
    return (time.time(), 0.0) if started is None else (started, EXIT_S)


def max_steps_binds(explicit: set[str], resolved: dict, minutes: float) -> bool:
    """Whether run.max_steps caps the run: always without a time budget; with one, only where
    run.max_steps was given (in a TOML file or on the command line) when the run began."""
    if not minutes:
        return True
    if "max_steps_binds" in resolved:  # a resumed run keeps its first decision
        return bool(resolved["max_steps_binds"])
    return "run.max_steps" in explicit


class Clock:
    """The time budget of a run (minutes 0: none, and progress() is None)."""

    def __init__(self, minutes: float, started: float | None = None, exit_s: float = 0.0,
                 timer: Callable[[], float] = time.time, agree: Callable[[float], float] | None = None):
        self.budget = minutes * 60.0
        self.timer = timer
        self.started = timer() if started is None else started
        self.exit_s = exit_s  # kept after the final sample (command_start)
        self.spent = 0.0  # seconds spent by the run's earlier processes (resume)
        self.costs: dict[str, float] = {}  # measured seconds of an eval, a sample, a checkpoint
        self.guess: dict[str, float] = {}  # their estimates, per step time (see expect)
        self.steps: deque[float] = deque(maxlen=9)  # recent step-to-step intervals
        self.last: float | None = None  # when the last step began
        self.now_progress: float | None = None  # the last step's progress
        self.agree = agree or _rank0

    @property
    def on(self) -> bool:
        return self.budget > 0

    def elapsed(self, now: float | None = None) -> float:
        """Seconds of the budget spent so far, earlier processes of this run included."""
        return self.spent + (self.timer() if now is None else now) - self.started

    def expect(self, eval_tokens: int, batch_tokens: int, sample_tokens: int, checkpoint_bytes: int) -> None:
        """What the final evaluation, sample and checkpoint hold, for the estimates used until
        their cost is measured: an eval in steps, a sample per token, a checkpoint by its bytes."""
        self.guess = {"eval_steps": EVAL_COST * eval_tokens / max(1, batch_tokens),
                      "sample": SAMPLE_TOKEN_S * sample_tokens, "checkpoint": checkpoint_bytes / CHECKPOINT_BYTES_S}

    def step_s(self) -> float:
        """A step's duration: the upper quartile of the recent intervals, which the one that held
        an evaluation does not move and which errs long where the machine's load varies."""
        return sorted(self.steps)[3 * len(self.steps) // 4] if self.steps else 0.0

    def reserve(self) -> float:
        """Seconds kept for the end: the final evaluation, checkpoint, sample, and the exit."""
        g, c = self.guess, self.costs
        ev = c.get("eval", g.get("eval_steps", 0.0) * self.step_s())
        return ev + c.get("sample", g.get("sample", 0.0)) + c.get("checkpoint", g.get("checkpoint", 0.0)) + self.exit_s

    def horizon(self) -> float:
        """Elapsed seconds at which the last step starts (the schedule reaches its floor)."""
        return self.budget - self.reserve() - self.step_s()

    def progress(self) -> float | None:
        """Called as each step starts: the schedule's progress, elapsed / horizon (>= 1: the
        last step), or None without a budget."""
        if not self.on:
            return None
        now = self.timer()
        if self.last is not None:
            self.steps.append(now - self.last)
        self.last = now
        horizon = self.horizon()
        p = self.elapsed(now) / horizon if horizon > 0 else math.inf
        # never back: a horizon that moves out (steps got faster) does not raise the LR again
        self.now_progress = max(self.agree(p), self.now_progress or 0.0)
        return self.now_progress

    def passed(self) -> bool:
        """The step just taken was the last: it started at the horizon."""
        return self.now_progress is not None and self.now_progress >= 1

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Measure a mid-run eval / sample / checkpoint: the reserve uses the latest."""
        t0 = self.timer()
        yield
        self.costs[what] = self.timer() - t0

    def describe(self) -> str:
        return f"{self.elapsed() / 60:.2f} of {self.budget / 60:g} min"

    def state_dict(self) -> dict:
        return {"spent_s": float(self.elapsed()), "costs": dict(self.costs)}

    def load_state_dict(self, state: dict | None) -> None:
        """A resumed run continues the clock. Ignored once steps are running: a rollback's
        restore does not turn the clock back."""
        if state is None or self.last is not None:
            return
        self.spent = float(state.get("spent_s", 0.0))
        self.costs.update({k: float(v) for k, v in state.get("costs", {}).items()})


def _rank0(value: float) -> float:
    """`value` as rank 0 has it, under torch.distributed; else itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
