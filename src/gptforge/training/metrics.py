"""What a run tells the world: a tqdm bar (or plain lines when not on a terminal),
RUN_DIR/metrics.jsonl (the source of truth), and an optional tracker. Rank 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm


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


class Reporter:
    """One printer and logger for the whole run. Does nothing on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int, tracker=None, progress: bool = True):
        self.enabled = enabled
        self.tracker = tracker
        self.val_bpb = None  # the last evaluation's bits per byte, kept on the bar
        self.bar = None
        self.file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
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
