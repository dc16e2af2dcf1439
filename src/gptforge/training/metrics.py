"""What a run tells the world: a tqdm bar (or plain lines when not on a terminal),
RUN_DIR/metrics.jsonl (the source of truth), and an optional tracker. Rank 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gptforge.device import Runtime
from gptforge.fsutil import atomic_write_text
from gptforge.measure import best_peak_tflops, cpu_matmul_rates, peak_tflops


def fmt_tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def train_line(row: dict) -> str:
    mfu = f" | mfu {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else ""
    if row.get("mfu") is not None and row.get("mfu_best") is not None and row["mfu_best"] < 0.99 * row["mfu"]:
        mfu += f" ({row['mfu_best'] * 100:.1f}% of the best dtype)"  # a run in the slower dtype shows as such
    return (
        f"step {row['step']:>6} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | norm {row['grad_norm']:.3f}"
        f" | {row['dt_ms']:.0f} ms | {fmt_tokens(row['tokens_per_s'])} tok/s{mfu}"
    )


class Peaks:
    """The two MFU denominators: the peak FLOP/s of the precision in use (`mfu`) and of the device's
    best dtype (`mfu_best`); run.peak_tflops overrides both, else a GPU table or the CPU probe."""

    def __init__(self, rt: Runtime, override: float = 0.0):
        self.rt, self.override = rt, override
        self.peak = peak_tflops(rt.device, rt.precision, override) * 1e12
        best, self.best_dtype = best_peak_tflops(rt.device, override)
        self.best = max(best * 1e12, self.peak)
        self.remeasured = False

    def mfu(self, flops_per_s: float) -> tuple[float, float]:
        """(mfu, mfu_best) of a device running at flops_per_s. A CPU probe taken on a busy machine
        can be beaten: then it is measured again, once a run (~0.3 s)."""
        if flops_per_s > self.peak and self.rt.device.type == "cpu" and not self.override and not self.remeasured:
            self.remeasured = True
            cpu_matmul_rates(refresh=True)
            self.peak = max(self.peak, peak_tflops(self.rt.device, self.rt.precision) * 1e12)
            best, self.best_dtype = best_peak_tflops(self.rt.device)
            self.best = max(best * 1e12, self.peak)
        return flops_per_s / self.peak, flops_per_s / self.best

    def line(self) -> str:
        """The two MFU denominators, as the banner states them (docs/performance.md)."""
        return (f"MFU peak {self.rt.precision} {self.peak / 1e12:.3f} TFLOP/s; device best "
                f"{self.best_dtype} {self.best / 1e12:.3f} TFLOP/s (mfu_best)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads"


METRICS = "metrics.jsonl"


def steps_done(row: dict) -> int:
    """How many optimizer steps the run had taken when `row` was logged: a train row (it has the
    step's lr) is logged at the end of its step, every other row (evaluation, event) between steps."""
    return row["step"] + 1 if "lr" in row else row["step"]


def trim_metrics(run_dir: Path, step: int) -> int:
    """Drop the rows logged after `step` steps (and a line torn by a kill) from run_dir's metrics:
    a run resumed at `step` logs those steps again. Replaces the file atomically; returns the
    number of lines dropped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and steps_done(row) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in keep))
    return len(lines) - len(keep)


class Reporter:
    """One printer and logger for the whole run. Does nothing on ranks other than 0. A run resumed
    at step N (`resumed`) first drops the rows logged after step N, so no step has two rows."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int, tracker=None, progress: bool = True,
                 resumed: bool = False):
        self.enabled = enabled
        self.tracker = tracker
        self.val_bpb = None  # the last evaluation's bits per byte, kept on the bar
        self.bar = None
        self.file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            trim_metrics(run_dir, start_step)
        self.file = open(run_dir / METRICS, "a", buffering=1)
        self.interactive = progress and sys.stderr.isatty() and not os.environ.get("CI")
        if self.interactive:
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.progress = progress

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, row: dict, echo: bool = True) -> None:
        """Append one row to metrics.jsonl (and the tracker); train rows move the bar."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.tracker is not None:
            self.tracker.log(row)
        if row.get("val_bpb") is not None:
            self.val_bpb = row["val_bpb"]
        if "loss" in row and "dt_ms" in row:
            if self.bar is not None:
                val = f" | val bpb {self.val_bpb:.3f}" if self.val_bpb is not None else ""
                self.bar.set_postfix_str(train_line(row).split("| ", 1)[1] + val, refresh=False)
                self.bar.update(row["step"] + 1 - self.bar.n)
            elif echo and self.progress:
                print(train_line(row), flush=True)

    def tick(self, steps_done: int) -> None:
        """Move the bar to `steps_done` steps without a row: a step whose values are still on the
        device (it does not log). The bar keeps showing the last values read."""
        if self.bar is not None and steps_done != self.bar.n:
            self.bar.update(steps_done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tracker is not None:
            self.tracker.close()
