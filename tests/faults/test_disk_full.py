"""A full disk while saving a checkpoint: the previous checkpoint stays intact (same bytes), no
partial directory appears under a final name, and the error says what happened (the file and
"No space left on device"). Then, space freed, `--resume auto` carries on as if nothing happened.

Two ways: ENOSPC injected in-process into each write of the save path (safetensors, the file
torch.save writes through, fsync), and a real full filesystem: a small tmpfs mounted in a user
namespace (`unshare -rm`), where the kernel itself says ENOSPC (skipped where not permitted).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

import gptforge.checkpoint as model_ckpt
import gptforge.fsutil as fsutil
from gptforge import config as C
from gptforge.errors import GPTForgeError
from gptforge.training import checkpoint as ckpt
from gptforge.training.trainer import train

from .conftest import NANO, flags, losses_by_step, metrics_rows, tree_digest

ENOSPC = "No space left on device"


def cfg_for(run: Path, data: Path, **over) -> C.TrainConfig:
    d = dict(NANO, **{"data.dir": str(data), "run.dir": str(run), "run.ckpt_every": "1", "run.keep_last": "3"})
    d.update({k: str(v) for k, v in over.items()})
    return C.resolve(None, list(d.items()))


class FullFile:
    """A file on a disk that fills up after `room` bytes: the write that crosses it writes what fits
    and raises ENOSPC, as the kernel does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def inject(kind: str, monkeypatch) -> None:
    if kind == "model.safetensors":  # safetensors writes what fits, then reports the OS error
        real = model_ckpt.save_file

        def save_file(state, filename, metadata=None):
            real(state, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 3)
            raise SafetensorError(f"Error while serializing: I/O error: {ENOSPC} (os error 28)")

        monkeypatch.setattr(model_ckpt, "save_file", save_file)
    elif kind == "state.pt":  # the disk fills up inside torch.save's zip writer
        monkeypatch.setattr(ckpt, "open", lambda path, mode="r", *a, **k: FullFile(open(path, mode, *a, **k), 100_000),
                            raising=False)
    elif kind == "fsync":  # delayed allocation: the data is accepted, the fsync fails
        real_fsync = fsutil.fsync_file

        def fsync_file(path):
            if Path(path).name == "state.pt":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(path)

        monkeypatch.setattr(fsutil, "fsync_file", fsync_file)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["model.safetensors", "state.pt", "fsync"])
def test_enospc_while_saving_keeps_the_previous_checkpoint(tmp_path, shards_dir, monkeypatch, kind):
    run = tmp_path / "run"
    train(cfg_for(run, shards_dir, **{"run.max_steps": 2}), progress=False)
    before = tree_digest(ckpt.checkpoints_dir(run))
    assert "step_000002/state.pt" in before

    with monkeypatch.context() as m:
        inject(kind, m)
        with pytest.raises(GPTForgeError) as ei:
            train(cfg_for(run, shards_dir, **{"run.max_steps": 4}), resume="auto", progress=False)
    msg = str(ei.value)
    assert "\n" not in msg
    assert ENOSPC in msg and "step_000003" in msg and "step_000002 is intact" in msg, msg
    if kind != "fsync":
        assert kind in msg, msg
    assert tree_digest(ckpt.checkpoints_dir(run)) == before  # same bytes, no temp dir, no step_000003

    # space freed: resuming redoes step 2 from step_000002 and goes on; nothing was lost
    res = train(cfg_for(run, shards_dir, **{"run.max_steps": 4}), resume="auto", progress=False)
    assert res.step == 4 and sorted(res.losses) == [2, 3]
    first_try = [r for r in metrics_rows(run) if r.get("step") == 2 and "loss" in r][0]
    assert res.losses[2] == first_try["loss"]  # bitwise: the failed attempt and the retry agree


def test_enospc_while_rewriting_the_same_step_keeps_it(tmp_path, shards_dir, monkeypatch):
    """Resuming a finished run saves step_N again (staged, then swapped): a full disk during the
    staging leaves the existing step_N as it was."""
    run = tmp_path / "run"
    cfg = cfg_for(run, shards_dir, **{"run.max_steps": 2})
    train(cfg, progress=False)
    before = tree_digest(ckpt.checkpoints_dir(run))
    inject("state.pt", monkeypatch)
    with pytest.raises(GPTForgeError, match=f"saving checkpoint step_000002 failed: state.pt: {ENOSPC}"):
        train(cfg, resume="auto", progress=False)
    assert tree_digest(ckpt.checkpoints_dir(run)) == before


# ------------------------------------------------------------------------------ a real full disk


def can_mount_tmpfs(where: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        p = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{where}'"],
                           capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


SCRIPT = """\
set -u
mount -t tmpfs -o size=160m tmpfs "$MNT" || exit 90
"$PY" -m gptforge train $FLAGS --run.dir "$MNT/run" --run.max_steps 2 > "$OUT/first.log" 2>&1 || exit 91
"$PY" "$OUT/digest.py" "$MNT/run/checkpoints" > "$OUT/before.json"
"$PY" "$OUT/fill.py" "$MNT" "$ROOM"
"$PY" -m gptforge train --resume auto --run.dir "$MNT/run" --run.max_steps 4 > "$OUT/second.log" 2> "$OUT/second.err"
echo $? > "$OUT/rc"
"$PY" "$OUT/digest.py" "$MNT/run/checkpoints" > "$OUT/after.json"
ls -a "$MNT/run/checkpoints" > "$OUT/ls"
if [ "$ROOM" = weights ]; then  # and then no room at all
  "$PY" "$OUT/fill.py" "$MNT" none
  "$PY" -m gptforge train --resume auto --run.dir "$MNT/run" --run.max_steps 4 > "$OUT/full.log" 2> "$OUT/full.err"
  echo $? > "$OUT/rc_full"
  "$PY" "$OUT/digest.py" "$MNT/run/checkpoints" > "$OUT/after_full.json"
fi
rm -f "$MNT"/filler*
"$PY" -m gptforge train --resume auto --run.dir "$MNT/run" --run.max_steps 4 > "$OUT/third.log" 2>&1
echo $? > "$OUT/rc3"
cp "$MNT/run/metrics.jsonl" "$OUT/metrics.jsonl"
"""

DIGEST = """\
import hashlib, json, sys
from pathlib import Path
root = Path(sys.argv[1])
print(json.dumps({str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(root.rglob("*"))}))
"""

FILL = """\
import os, sys
mnt, room = sys.argv[1], sys.argv[2]
weights = os.path.getsize(os.path.join(mnt, "run", "checkpoints", "step_000002", "model.safetensors"))
free = {"small": 1 << 20, "weights": weights + (4 << 20), "none": 0}[room]  # state.pt is ~2x the weights
st = os.statvfs(mnt)
with open(os.path.join(mnt, "filler-" + room), "wb") as f:
    left = st.f_bavail * st.f_frsize - free
    try:
        while left > 0:
            left -= f.write(b"\\0" * min(left, 1 << 20))
            f.flush()
    except OSError:  # full
        pass
"""


@pytest.mark.slow
@pytest.mark.parametrize("fails_at", ["model.safetensors", "state.pt"])
def test_real_full_tmpfs(tmp_path, shards_dir, fails_at):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a size-limited tmpfs here (unshare -rm not permitted)")
    room = "small" if fails_at == "model.safetensors" else "weights"
    out = tmp_path / "out"
    out.mkdir()
    (out / "digest.py").write_text(DIGEST)
    (out / "fill.py").write_text(FILL)
    env = dict(os.environ, MNT=str(mnt), OUT=str(out), PY=sys.executable, ROOM=room,
               FLAGS=" ".join(flags(None, shards_dir, **{"run.ckpt_every": 1, "run.keep_last": 2})))
    p = subprocess.run(["unshare", "-rm", "bash", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr, *(f.read_text()[-2000:] for f in out.glob("*.log")))

    err = (out / "second.err").read_text().strip()
    print(f"full tmpfs, {fails_at}: {err}")
    assert (out / "rc").read_text().strip() == "1", err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("gptforge train: error: saving checkpoint step_000003 failed: " + fails_at), err
    assert ENOSPC in err and "step_000002 is intact" in err, err
    before, after = json.loads((out / "before.json").read_text()), json.loads((out / "after.json").read_text())
    assert after == before, "the checkpoints on the full disk changed"
    assert [n for n in (out / "ls").read_text().split() if n.startswith((".tmp", "step_000003"))] == []
    if room == "weights":  # a disk with no room at all: the run cannot even write its config.json
        err = (out / "full.err").read_text().strip()
        print(f"full tmpfs, no room at all: {err}")
        assert (out / "rc_full").read_text().strip() == "1", err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        # the run's first write (its metrics file or config.json) is the one the line names
        assert err.endswith((f"run/config.json: {ENOSPC}", f"run/metrics.jsonl: {ENOSPC}")), err
        assert json.loads((out / "after_full.json").read_text()) == before
    # space freed: the same command finishes the run
    assert (out / "rc3").read_text().strip() == "0", (out / "third.log").read_text()[-3000:]
    losses = losses_by_step(out)
    assert sorted(losses) == [0, 1, 2, 3]
