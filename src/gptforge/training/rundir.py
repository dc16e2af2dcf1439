"""A run directory belongs to one run, and one writer at a time.

RUN_DIR/run.json     {"run_id": ..., "created": ..., "resumed_from": ...}, written when a run claims
                     the directory; every later write of the run (config.json, checkpoints) checks
                     that the directory still names this run
RUN_DIR itself      carries an exclusive flock held by the writing process for the whole run
                     (the kernel's lock table names its pid); the kernel drops it when the holder
                     exits or is killed, so a dead run leaves no stale lock

A fresh run into a directory that holds another run's checkpoints is refused (resume it, choose
another directory, or replace it with run.overwrite); `--resume CKPT` writes to the checkpoint's
own run directory as found on disk (`resume_run_dir`), never to a path recorded inside it.
Only rank 0 claims: the other ranks of a torchrun job write nothing of the run's.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gptforge.errors import GPTForgeError
from gptforge.fsutil import atomic_write_text
from gptforge.training.trackers import TB_DIR, WANDB_ID_FILE

RUN_FILE = "run.json"
# what a run writes into its directory: what run.overwrite removes (nothing else of the user's)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.json", TB_DIR, "wandb", WANDB_ID_FILE, RUN_FILE)

_HELD: dict[str, "Claim"] = {}  # resolved run dir -> the claim this process holds on it


@dataclass
class Claim:
    """This process's hold on a run directory. A directory that does not exist yet is created,
    locked and named (run.json) at the run's first write, so a run that fails before it leaves
    nothing behind; an existing one is locked at once."""

    path: Path
    run_id: str
    fd: int
    own: bool  # continues the run the directory holds
    pending: dict | None  # the run.json to write at the first write

    def start(self) -> None:
        if self.fd < 0:
            self.path.mkdir(parents=True, exist_ok=True)
            self.fd = _lock(self.path)
            if not self.own and _has_checkpoints(self.path):  # another run got there first
                raise _refusal(self.path, None)
        if self.pending is not None:
            atomic_write_text(self.path / RUN_FILE, json.dumps(self.pending, indent=2) + "\n")
            self.pending = None

    def release(self) -> None:
        _HELD.pop(str(self.path.resolve()), None)
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _refusal(path: Path, record: dict | None) -> GPTForgeError:
    what = f"run {record['run_id']}'s" if record else "another run's"
    return GPTForgeError(
        f"{path}: holds {what} checkpoints; a new run would mix with them. Continue that run with --resume auto, "
        "write this one elsewhere with a new --run.dir, or replace the old run's checkpoints and metrics with "
        "--run.overwrite true")


def resume_run_dir(ckpt: Path, given: str | None) -> str:
    """Where `--resume CKPT` writes: the --run.dir the user gave, else the checkpoint's own run
    directory as found on disk (CKPT/../..), never the run.dir recorded inside the checkpoint
    (a copied run keeps its original's path there, and a crafted one any path at all)."""
    if given:
        return given
    ckpt = Path(ckpt)
    if ckpt.parent.name == "checkpoints":
        return str(ckpt.parent.parent)
    raise GPTForgeError(f"--resume {ckpt}: not inside a run directory (RUN/checkpoints/step_N); "
                        "pass --run.dir for the run to write to")


def _has_checkpoints(path: Path) -> bool:
    ckdir = path / "checkpoints"
    return ckdir.is_dir() and any(p.name.startswith("step_") for p in ckdir.iterdir())


def _read_record(path: Path) -> dict | None:
    f = path / RUN_FILE
    try:
        record = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise GPTForgeError(f"{f}: unreadable ({e}); it names the run that owns {path}") from e
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise GPTForgeError(f"{f}: field 'run_id' missing or not a string")
    return record


def _lock(path: Path) -> int:
    """The run directory's exclusive lock (a flock on the directory itself, so a refused run
    leaves no file behind), or one line naming the process that holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise GPTForgeError(f"{path}: another gptforge train (pid {holder}) is writing to this run directory; "
                            "wait for it to finish (or stop it), or choose another --run.dir") from None
    return fd


def _holder(fd: int) -> str:
    """The pid holding a flock on `fd`'s file, from the kernel's table (Linux); "unknown" elsewhere."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and "->" not in parts and key in parts:
                    return parts[parts.index(key) - 1]
    except OSError:
        pass
    return "unknown"


def _inside(ckpt: Path, path: Path) -> bool:
    r, p = ckpt.resolve(), path.resolve()
    return r == p or p in r.parents


def claim(run_dir: str | Path, resume: str | None, overwrite: bool = False) -> Claim:
    """Lock `run_dir` (if it exists) and make it this run's: continue its own run (`resume` is
    "auto", the run directory itself or one of its checkpoints), start in a new, empty or
    checkpoint-free one, or (with `overwrite`) remove another run's outputs first. A fresh run
    into a directory holding another run's checkpoints is refused in one line."""
    path = Path(run_dir)
    own = resume is not None and (resume == "auto" or _inside(Path(resume), path))
    fd = _lock(path) if path.is_dir() else -1
    try:
        record = _read_record(path) if fd >= 0 else None
        if not own and fd >= 0 and _has_checkpoints(path):
            if not overwrite:
                raise _refusal(path, record)
            for name in RUN_OUTPUTS:  # asked for in so many words: the old run's outputs, nothing else
                victim = path / name
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim)
                elif victim.exists() or victim.is_symlink():
                    victim.unlink()
            record = None
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    pending = None
    if record is None or not own:
        pending = record = {"run_id": secrets.token_hex(8),
                            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "resumed_from": str(resume) if resume else None}
    held = Claim(path, record["run_id"], fd, own, pending)
    _HELD[str(path.resolve())] = held
    return held


def check_owner(run_dir: str | Path) -> None:
    """Before a write into `run_dir`: when this process claimed it, it must still name our run
    (nothing when it did not claim it: a library caller writing checkpoints of its own)."""
    path = Path(run_dir)
    held = _HELD.get(str(path.resolve()))
    if held is None:
        return
    held.start()
    record = _read_record(path)
    if record is None or record["run_id"] != held.run_id:
        now = f"run {record['run_id']}" if record else f"no run (its {RUN_FILE} is gone)"
        raise GPTForgeError(f"{path}: the run directory now belongs to {now}, not to this run ({held.run_id}); "
                            "stopping without writing into it")


@contextlib.contextmanager
def owned(cfg, resume: str | None) -> Iterator[Claim | None]:
    """The trainer's hold on its run directory, from before anything is written until the run
    ends (rank 0 only). Released on exit; a killed holder's lock goes with its process."""
    if os.environ.get("RANK", "0") != "0":
        yield None
        return
    held = claim(cfg.run.dir, resume, overwrite=cfg.run.overwrite)
    try:
        yield held
    finally:
        held.release()
