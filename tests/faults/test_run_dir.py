"""A run directory belongs to one run, and one writer at a time.

`--resume CKPT` writes to the checkpoint's own run directory as found on disk (or the --run.dir
given), never to the path recorded inside the checkpoint; a fresh `train` into a directory that
holds another run's checkpoints is refused with the choices; a second writer is refused with one
line naming the first one's pid, and a holder killed with -9 leaves no lock behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptforge import config as C
from gptforge.checkpoint import write_sums
from gptforge.training.trainer import train

from .conftest import NANO, assert_one_line_error, cli_env, flags, metrics_rows, run_cli, tree_digest


def nano_train(run: Path, data: Path, steps: int = 3) -> None:
    over = dict(NANO, **{"data.dir": str(data), "run.dir": str(run), "run.max_steps": str(steps),
                         "run.ckpt_every": "1", "run.keep_last": "5", "run.sample_tokens": "0"})
    train(C.resolve(None, list(over.items())), progress=False)


def step(run: Path, n: int) -> Path:
    return run / "checkpoints" / f"step_{n:06d}"


def test_resume_of_a_copy_writes_into_the_copy(tmp_path, shards_dir, gf):
    """cp -a runs/good runs/copy; --resume runs/copy/checkpoints/step_3 (and --run.dir copy
    --resume auto) leave runs/good as it was: the checkpoint records good's path, not copy's."""
    good = tmp_path / "good"
    nano_train(good, shards_dir)
    before = tree_digest(good)

    copy = tmp_path / "copy"
    shutil.copytree(good, copy)
    r = gf("train", "--resume", str(step(copy, 3)), "--run.max_steps", "4")
    assert r.returncode == 0, r.stderr
    assert tree_digest(good) == before, "resuming the copy wrote into the original run"
    assert step(copy, 4).is_dir()
    assert max(row["step"] for row in metrics_rows(copy)) >= 3

    again = tmp_path / "again"
    shutil.copytree(good, again)
    r = gf("train", "--run.dir", str(again), "--resume", "auto", "--run.max_steps", "4")
    assert r.returncode == 0, r.stderr
    assert tree_digest(good) == before, "--resume auto in a copied run dir wrote into the original run"
    assert step(again, 4).is_dir()


def test_run_dir_recorded_in_a_crafted_checkpoint_is_not_followed(tmp_path, shards_dir, gf):
    run = tmp_path / "run"
    nano_train(run, shards_dir)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text('{"mine": true}\n')
    meta_path = step(run, 3) / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["train"]["run"]["dir"] = str(victim)
    meta_path.write_text(json.dumps(meta))
    write_sums(step(run, 3))  # a deliberate tamperer rewrites the sums
    before = tree_digest(victim)

    r = gf("train", "--resume", str(step(run, 3)), "--run.max_steps", "4")
    assert r.returncode == 0, r.stderr
    assert tree_digest(victim) == before, "the run.dir recorded inside the checkpoint was written to"
    assert step(run, 4).is_dir()


def test_fresh_train_into_a_used_run_dir_is_refused(tmp_path, shards_dir, gf):
    run = tmp_path / "run"
    nano_train(run, shards_dir)
    before = tree_digest(run)

    r = gf("train", *flags(run, shards_dir, **{"run.max_steps": 2, "run.ckpt_every": 1, "run.seed": 7}))
    assert_one_line_error(r, "train", str(run), "--resume auto", "--run.dir", "--run.overwrite")
    assert tree_digest(run) == before, "a refused run changed the run directory"

    # --resume auto continues this run, not some other
    r = gf("train", "--run.dir", str(run), "--resume", "auto", "--run.max_steps", "4")
    assert r.returncode == 0, r.stderr
    assert step(run, 4).is_dir()

    # --run.overwrite: the new run replaces the old one's checkpoints and metrics, nothing mixed
    (run / "notes.txt").write_text("the user's own file\n")
    r = gf("train", *flags(run, shards_dir, **{"run.max_steps": 2, "run.ckpt_every": 1, "run.seed": 7,
                                               "run.overwrite": "true", "run.sample_tokens": 0}))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_000001", "step_000002"], names
    assert max(row["step"] for row in metrics_rows(run)) <= 2
    assert (run / "notes.txt").read_text() == "the user's own file\n"


def wait_for(predicate, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path, shards_dir):
    run = tmp_path / "run"
    args = flags(run, shards_dir, **{"run.max_steps": 100000, "run.ckpt_every": 2, "run.keep_last": 2,
                                     "run.sample_tokens": 0})
    first = subprocess.Popen([sys.executable, "-m", "gptforge", "train", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=cli_env())
    try:
        wait_for(lambda: (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*")))
        second = run_cli("train", "--run.dir", str(run), "--resume", "auto", "--run.max_steps", "1")
        assert_one_line_error(second, "train", str(run), f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the holder died: its lock went with it
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if p.name[5:].isdigit())
    r = run_cli("train", "--run.dir", str(run), "--resume", "auto", "--run.max_steps", str(steps[-1] + 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert step(run, steps[-1] + 1).is_dir()
