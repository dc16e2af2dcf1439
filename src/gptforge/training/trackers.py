"""Optional experiment trackers: Weights & Biases and TensorBoard, behind one small interface.

metrics.jsonl stays the source of truth; a tracker only mirrors its rows. Both backends are
optional dependencies, imported when a tracker is made, never at import time; a missing one is a
GPTForgeError naming the pip package. The trainer makes a tracker on rank 0 only.

This module imports nothing of the trainer: `make_tracker(kind, run_dir, config, project, name)`
is all it needs, and `log(row)` takes the same dicts that go to metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Protocol

from gptforge.errors import GPTForgeError

KINDS = ("none", "wandb", "tensorboard")
WANDB_ID_FILE = "wandb_id.txt"  # a resumed run continues the same W&B run
TB_DIR = "tb"


class Tracker(Protocol):
    def log(self, row: dict) -> None:
        """Mirror one metrics row; row["step"] is the x axis, its other numbers are the values."""

    def close(self) -> None:
        """Flush and finish."""


def scalars(row: dict) -> dict[str, float]:
    """The numeric fields of a row, less the step (bools and strings such as "event" dropped)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class NullTracker:
    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class WandbTracker:
    """wandb reads WANDB_MODE (offline, disabled), WANDB_DIR etc. from the environment itself."""

    def __init__(self, run_dir: Path, config: dict, project: str, name: str):
        try:
            import wandb
        except ImportError as e:
            raise GPTForgeError(
                "run.log=wandb needs the 'wandb' package: pip install wandb "
                "(or pip install 'gptforge[wandb]'), or use --run.log none"
            ) from e
        self._wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if not run_id:
            run_id = secrets.token_hex(4)  # wandb run ids: letters, digits, - and _
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=project, name=name, config=config, dir=str(run_dir), id=run_id, resume="allow"
        )

    def log(self, row: dict) -> None:
        values = scalars(row)
        if values:
            self.run.log(values, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """Event files in RUN_DIR/tb; the resolved config as text at step 0."""

    def __init__(self, run_dir: Path, config: dict, project: str, name: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise GPTForgeError(
                "run.log=tensorboard needs the 'tensorboard' package: pip install tensorboard "
                "(or pip install 'gptforge[tensorboard]'), or use --run.log none"
            ) from e

        self.log_dir = run_dir / TB_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        text = "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```"
        self.writer.add_text("config", text, global_step=0)
        self.writer.add_text("run", f"project {project}, name {name}", global_step=0)

    def log(self, row: dict) -> None:
        step = int(row["step"])
        for key, value in scalars(row).items():
            if math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_tracker(kind: str, run_dir: str | Path, config: dict, project: str = "gptforge", name: str = "") -> Tracker:
    """kind: none | wandb | tensorboard. name defaults to the run directory's name."""
    run_dir = Path(run_dir)
    name = name or run_dir.resolve().name
    if kind == "none":
        return NullTracker()
    if kind == "wandb":
        return WandbTracker(run_dir, config, project, name)
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, config, project, name)
    raise GPTForgeError(f"run.log must be one of {', '.join(KINDS)}, got {kind!r}")
