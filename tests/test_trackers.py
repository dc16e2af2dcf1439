"""Trackers: 'none' is free, missing optional packages say what to install, TensorBoard writes events."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import gptforge.training.trackers as trackers
from gptforge.errors import GPTForgeError
from gptforge.training.trackers import make_tracker, scalars

ROWS = [
    {"step": 0, "tokens": 1024, "loss": 10.9, "lr": 1e-4, "grad_norm": 2.0, "dt_ms": 5.0, "tokens_per_s": 2e5, "mfu": 0.1},
    {"step": 1, "tokens": 2048, "loss": 10.1, "lr": 2e-4, "grad_norm": 1.5, "skipped": True, "reason": "spike"},
    {"step": 2, "tokens": 2048, "val_loss": 9.5, "val_ppl": 13360.7},
    {"step": 2, "event": "rollback", "checkpoint": "runs/x/checkpoints/step_000000", "lr_scale": 0.5},
]


def test_none_tracker(tmp_path):
    t = make_tracker("none", tmp_path, {"optim": {"lr": 1e-3}}, "proj", "name")
    for row in ROWS:
        t.log(row)
    t.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_kind(tmp_path):
    with pytest.raises(GPTForgeError, match="none, wandb, tensorboard"):
        make_tracker("mlflow", tmp_path, {}, "proj", "")


def test_scalars_keep_numbers_only():
    assert scalars(ROWS[1]) == {"tokens": 2048.0, "loss": 10.1, "lr": 2e-4, "grad_norm": 1.5}
    assert scalars(ROWS[3]) == {"lr_scale": 0.5}


def test_missing_wandb_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(GPTForgeError, match=r"'wandb' package: pip install wandb"):
        make_tracker("wandb", tmp_path, {}, "proj", "run")


def test_missing_tensorboard_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(GPTForgeError, match=r"'tensorboard' package: pip install tensorboard"):
        make_tracker("tensorboard", tmp_path, {}, "proj", "run")
    assert not (tmp_path / "tb").exists()


def test_tensorboard_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = make_tracker("tensorboard", tmp_path, {"optim": {"lr": 1e-3}}, "proj", "")
    for row in ROWS:
        t.log(row)
    t.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "lr", "val_loss", "val_ppl", "tokens", "lr_scale"} <= set(tags)
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss")] == [(0, 10.9), (1, 10.1)]
    assert [e.step for e in acc.Scalars("val_loss")] == [2]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = make_tracker("wandb", tmp_path, {"optim": {"lr": 1e-3}}, "gptforge-test", "offline-run")
    for row in ROWS[:3]:
        t.log(row)
    t.close()
    run_id = (tmp_path / trackers.WANDB_ID_FILE).read_text().strip()
    assert run_id and any(run_id in p.name for p in (tmp_path / "wandb").iterdir())


def test_trackers_module_imports_nothing_of_the_trainer():
    tree = ast.parse(Path(trackers.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    ours = {m for m in imported if m.startswith("gptforge")}
    assert ours == {"gptforge.errors"}
