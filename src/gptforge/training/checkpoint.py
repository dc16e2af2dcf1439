"""Training checkpoints: the native model format plus `state.pt`, written atomically.

RUN_DIR/checkpoints/step_NNNNNN/
    model.safetensors   weights (safetensors, tied head stored once)
    config.json         {"model": GPTConfig, "train": TrainConfig, "step": N, "tokenizer": {...}, ...}
    gptforge-tokenizer.json   a trained tokenizer (none for GPT-2's)
    state.pt            optimizer, scaler, schedule, every RNG state, loader position; plain
                        tensors/containers only, so it loads with torch.load(weights_only=True)
    SHA256SUMS          the sha256 of the three files above, written last (see gptforge.checkpoint)

A checkpoint directory only ever appears under its final name complete (temp dir, fsync,
rename), so `--resume auto` can trust any `step_*` directory it finds to be whole; its sums say
whether it is still what was written. `--resume auto` takes the newest checkpoint that matches
them, warning about (and keeping) every newer one that does not; an explicit `--resume DIR`
of a damaged checkpoint is an error. A damaged checkpoint is never deleted: where a later save
would replace or prune it, it is renamed `step_N.damaged` instead.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from gptforge.checkpoint import (
    CONFIG, SUMS, WEIGHTS, ChecksumError, load_state_checked, one_line, read_config, verify_dir, verify_files,
    write_model_files, write_sums,
)
from gptforge.errors import GPTForgeError
from gptforge.fsutil import TMP_PREFIX, atomic_dir, remove_stale_tmp
from gptforge.model import GPT, GPTConfig
from gptforge.training import rundir

STATE = "state.pt"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
DAMAGED = ".damaged"  # suffix of a damaged checkpoint moved aside (never resumed from, never deleted)
_DAMAGED_SEEN: set[str] = set()  # checkpoints `--resume auto` skipped in this process


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNGs, as weights_only-loadable values: Python's, NumPy's, torch's CPU
    generator and, when `device` is a GPU, that GPU's generator (only this rank's own: the others
    belong to other ranks, or to no one)."""
    np_state = np.random.get_state()
    on_gpu = device is not None and device.type == "cuda"
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if on_gpu else None,
    }


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what rng_state saved. A GPU generator is restored only onto a GPU (a CPU run of a
    GPU checkpoint has none to restore). Checkpoints before one-state-per-rank saved every
    visible GPU's generator (a list): the entry of `device`'s index is taken, when it has one."""
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # the old format: torch.cuda.get_rng_state_all() of rank 0
        index = (device.index or 0) if device is not None else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def restore_rng(saved, rank: int, world_size: int, device: torch.device | None = None) -> None:
    """This rank's RNGs from a checkpoint's `rng` entry: a list, one rng_state per saved rank (a
    single dict in checkpoints before that: rank 0's). At the same world size each rank takes its
    own. At another, the ranks the checkpoint had take theirs and the others keep the seed a fresh
    run gives them (seed + rank), and rank 0 warns: the dropout masks then differ from the
    uninterrupted run's, so it is reproduced only without dropout."""
    states = saved if isinstance(saved, list) else [saved]
    if not states or not all(isinstance(s, dict) for s in states):
        raise GPTForgeError("checkpoint: the RNG state is missing or damaged")
    if rank < len(states):
        set_rng_state(states[rank], device)
    if len(states) != world_size and rank == 0:
        import warnings

        others = "; ranks %d and up keep their fresh seed (seed + rank)" % len(states) if world_size > len(states) else ""
        warnings.warn(
            f"resuming the RNG states of {len(states)} rank(s) on {world_size}: each rank the checkpoint had takes its "
            f"own{others}. The dropout masks differ from the uninterrupted run's from here on, so it is reproduced (to "
            "rounding, as any change of world size allows) only without dropout (model.dropout 0)",
            stacklevel=2,
        )


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temp dirs of interrupted writes are ignored)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / WEIGHTS).is_file() and (p / CONFIG).is_file() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`auto` -> newest complete checkpoint of run_dir (None if there is none); a run dir -> its
    newest checkpoint; a checkpoint dir -> itself."""
    if resume == "auto":
        finish_interrupted_swaps(checkpoints_dir(run_dir))
        return newest_intact_checkpoint(run_dir)
    p = Path(resume)
    if (p / STATE).is_file():
        return p
    if checkpoints_dir(p).is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise GPTForgeError(f"--resume {resume}: the run directory has no complete checkpoint")
        return latest
    raise GPTForgeError(f"--resume {resume}: not a checkpoint directory (with {STATE}) nor a run directory")


def _warn(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one printer under torchrun
        print(f"gptforge: warning: {msg}", file=sys.stderr)


def newest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match its SHA256SUMS, warning about each newer one that
    does not (left where it is). None if the run has no checkpoint; an error if none is intact."""
    bad = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_dir(path)
        except ChecksumError as e:
            bad.append(str(e))
            _DAMAGED_SEEN.add(str(path.resolve()))
            _warn(f"skipping damaged checkpoint {path.name}: {e}; it is left in place")
            continue
        if bad:
            _warn(f"resuming from {path.name}, the newest intact checkpoint")
        return path
    if bad:
        raise GPTForgeError(f"--resume auto: no intact checkpoint in {checkpoints_dir(run_dir)}: {bad[0]}"
                            + (f" (and {len(bad) - 1} more damaged)" if len(bad) > 1 else ""))
    return None


def _set_aside_if_damaged(path: Path) -> bool:
    """A checkpoint that `--resume auto` found damaged is renamed step_N.damaged, not deleted."""
    if str(path.resolve()) not in _DAMAGED_SEEN:
        return False
    aside = path.with_name(path.name + DAMAGED)
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}{DAMAGED}.{n}"), n + 1
    os.rename(path, aside)
    _DAMAGED_SEEN.discard(str(path.resolve()))
    _warn(f"kept the damaged checkpoint {path.name} as {aside.name}")
    return True


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: GPT,
    model_state: dict[str, torch.Tensor],
    train_state: dict,
    train_config: dict,
    keep_last: int,
    tokenizer=None,
) -> Path:
    """Write RUN_DIR/checkpoints/step_NNNNNN atomically; then delete all but the newest keep_last."""
    rundir.check_owner(run_dir)  # the directory is still this run's
    ckdir = checkpoints_dir(run_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    finish_interrupted_swaps(ckdir)
    remove_stale_tmp(ckdir)
    final = ckdir / step_dir_name(step)
    extra = {"train": train_config, "step": step}
    writing = [final]  # the file being written, for the error message

    def write(tmp: Path) -> None:
        writing[0] = tmp / WEIGHTS
        write_model_files(tmp, model_state, model.config, extra, tokenizer)
        writing[0] = tmp / STATE
        _torch_save(train_state, tmp / STATE)
        writing[0] = tmp / SUMS
        write_sums(tmp)
        writing[0] = final  # what is left: fsync and rename

    try:
        if final.exists():
            _set_aside_if_damaged(final)
        if not final.exists():
            with atomic_dir(final) as tmp:
                write(tmp)
        else:  # a checkpoint of the same step exists (a rerun): stage the new one, then swap
            new, old = _swap_names(final)
            with atomic_dir(new) as tmp:
                write(tmp)
            os.rename(final, old)  # a kill between these two renames is undone by finish_interrupted_swaps
            os.rename(new, final)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, an I/O error: nothing is half-written
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        kept = latest_checkpoint(run_dir)
        raise GPTForgeError(
            f"saving checkpoint {final.name} failed: {writing[0].name}: {reason} (in {ckdir}); "
            + (f"the previous checkpoint {kept.name} is intact" if kept else "no earlier checkpoint exists")
        ) from e
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        if not _set_aside_if_damaged(old):
            shutil.rmtree(old, ignore_errors=True)
    return final


class _RecordingFile:
    """torch.save's zip writer swallows the OSError of a failed write (it reports "unexpected
    pos" instead); this file remembers it so the caller can say what happened (ENOSPC, EIO)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        out = _RecordingFile(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


def _swap_names(final: Path) -> tuple[Path, Path]:
    return final.with_name(TMP_PREFIX + final.name + ".new"), final.with_name(TMP_PREFIX + final.name + ".old")


def finish_interrupted_swaps(ckdir: Path) -> None:
    """A kill between the two renames of a same-step replacement leaves no step_N, only its complete
    staged `.new` (and the `.old` it replaces): put one back under the final name."""
    if not ckdir.is_dir():
        return
    for old in ckdir.glob(TMP_PREFIX + "step_*.old"):
        final = ckdir / old.name[len(TMP_PREFIX) : -len(".old")]
        new, _ = _swap_names(final)
        if STEP_DIR.match(final.name) and not final.exists():
            os.rename(new if new.is_dir() else old, final)


def load_train_state(ckpt: Path) -> dict:
    """state.pt through the safe unpickler: tensors and plain containers only, never code."""
    path = ckpt / STATE
    verify_files(ckpt, (STATE,))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e
    except pickle.UnpicklingError as e:  # the safe unpickler met something that is not data
        raise GPTForgeError(
            f"{path}: refused by the safe loader (weights_only=True): {_why(e)}; a training state holds only "
            "tensors and plain containers, so this file is damaged or was tampered with"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise GPTForgeError(f"{path}: unreadable training state ({_why(e)})") from e
    check_state_structure(state, path)
    return state


_why = one_line

# what every training state holds, and of which type (the old single-rank formats: a dict)
STATE_FIELDS = {"step": (int,), "optimizer": (dict,), "rng": (list, dict), "loader": (list, dict)}


def check_state_structure(state, path: Path) -> None:
    """A state.pt that unpickled safely but is not a training state (another file, a damaged or
    hand-made one) is one line naming the entry, not a KeyError deep in the resume."""
    if not isinstance(state, dict):
        raise GPTForgeError(f"{path}: not a training state (a {type(state).__name__}, expected a dict with "
                            f"{', '.join(STATE_FIELDS)})")
    for key, types in STATE_FIELDS.items():
        value = state.get(key)
        if key not in state:
            raise GPTForgeError(f"{path}: not a training state: entry {key!r} is missing")
        if not isinstance(value, types) or isinstance(value, bool):
            raise GPTForgeError(f"{path}: entry {key!r} must be {' or '.join(t.__name__ for t in types)}, "
                                f"got {type(value).__name__}")
    if not isinstance(state["optimizer"].get("param_groups", []), list):
        raise GPTForgeError(f"{path}: entry 'optimizer' holds no list of param_groups")


def load_checkpoint_model(ckpt: Path, model: GPT) -> None:
    """Load the weights of a checkpoint into an already-built model (shapes checked)."""
    state = load_state_checked(ckpt / WEIGHTS, model)
    model.load_state_dict(state, strict=False)


def checkpoint_meta(ckpt: Path) -> tuple[GPTConfig, dict]:
    meta = read_config(ckpt)
    train = meta.get("train")
    if not isinstance(train, dict):
        raise GPTForgeError(f"{ckpt / CONFIG}: field 'train' missing or not an object; not a training checkpoint")
    return GPTConfig.from_dict(meta["model"]), train


def write_run_config(run_dir: Path, config: dict) -> None:
    from gptforge.fsutil import atomic_write_text

    rundir.check_owner(run_dir)
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
