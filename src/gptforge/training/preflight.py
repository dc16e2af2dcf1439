"""Before step 0: everything the loop will need later is found now, so that nothing dies at step N
(losing that step's checkpoint) for a file or package that was missing from the start.

`check(cfg)` resolves the in-loop HellaSwag file (the configured one, else the official one,
downloaded once) and reads its first example, reads one example of each task of run.eval_tasks,
and checks that the tracker's package imports.
Rank 0 decides; the result (the HellaSwag path) is handed to the trainer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from gptforge.errors import GPTForgeError
from gptforge.eval.downstream import parse_loop_tasks
from gptforge.eval.tasks import load_task

TRACKER_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


@dataclass
class Ready:
    hellaswag_path: str | None = None  # resolved when run.hellaswag_every > 0


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


def check(cfg) -> Ready:
    """What the run will need, found before anything is trained or written (one line if not)."""
    ready = Ready()
    if cfg.run.hellaswag_every:
        from gptforge.eval.hellaswag import download_hellaswag, iter_examples

        path = Path(cfg.run.hellaswag_path) if cfg.run.hellaswag_path else download_hellaswag()
        try:
            next(iter_examples(path, max_examples=1))
        except StopIteration:
            raise GPTForgeError(f"{path}: holds no HellaSwag examples (run.hellaswag_every "
                                f"{cfg.run.hellaswag_every} needs them)") from None
        except GPTForgeError as e:
            raise GPTForgeError(f"run.hellaswag_every {cfg.run.hellaswag_every}: {e}") from None
        ready.hellaswag_path = str(path)
    if cfg.run.eval_tasks:  # the task names known and their request files there and readable
        specs, _ = parse_loop_tasks(cfg.run.eval_tasks)
        for spec in specs:
            try:
                load_task(spec, limit=1)
            except GPTForgeError as e:
                raise GPTForgeError(f"run.eval_tasks {cfg.run.eval_tasks!r}: {e}") from None
    if cfg.run.log in TRACKER_PACKAGES:
        module, package = TRACKER_PACKAGES[cfg.run.log]
        if not _importable(module):
            raise GPTForgeError(f"run.log={cfg.run.log} needs the '{package}' package: pip install {package}, "
                                "or use --run.log none")
    return ready
