"""The native model format: a directory with `model.safetensors` and `config.json`.

Every later piece builds on it: training checkpoints add a `state.pt` (see train/checkpoint.py),
`gptforge sample`, `eval` and `export` read it. Weights are safetensors (never pickle); the tied
LM head is stored once, as `transformer.wte.weight`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge import __version__
from gptforge.errors import GPTForgeError
from gptforge.fsutil import atomic_dir
from gptforge.model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED = "lm_head.weight"  # same storage as transformer.wte.weight: not stored twice


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """CPU, contiguous state dict without the tied duplicate and without non-persistent buffers."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED}


def write_model_files(directory: Path, state: dict[str, torch.Tensor], config: GPTConfig, extra: dict | None = None) -> None:
    """Write model.safetensors + config.json into an existing directory (callers make it atomic)."""
    directory = Path(directory)
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})  # one key: byte-reproducible
    meta = {"gptforge_version": __version__, "model": config.to_dict(), **(extra or {})}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def save_model(model: GPT, directory: str | Path, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Save atomically: the directory appears complete or not at all."""
    directory = Path(directory)
    if directory.exists():
        if not overwrite:
            raise GPTForgeError(f"{directory} already exists (pass --overwrite to replace it)")
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
        try:
            with atomic_dir(directory) as tmp:
                write_model_files(tmp, model_state_for_saving(model), model.config, extra)
        except BaseException:
            old.rename(directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return directory
    with atomic_dir(directory) as tmp:
        write_model_files(tmp, model_state_for_saving(model), model.config, extra)
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found; a gptforge checkpoint directory holds {WEIGHTS} and {CONFIG}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GPTForgeError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise GPTForgeError(f"{path}: missing the 'model' section (a GPTConfig)")
    return meta


def load_state_checked(path: Path, model: GPT) -> dict[str, torch.Tensor]:
    """Read a safetensors file and check every name and shape against `model`."""
    try:
        state = load_file(str(path))
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise GPTForgeError(f"{path}: not a readable safetensors file ({e})") from e
    check_state_matches(state, model, str(path))
    return state


def check_state_matches(state: dict[str, torch.Tensor], model: GPT, where: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {TIED})
    if missing or unexpected:
        raise GPTForgeError(f"{where}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise GPTForgeError(
                f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the model expects {tuple(shape)}"
            )


def load_model(directory: str | Path, **config_overrides) -> GPT:
    """Build the GPT described by config.json and load its weights (fp32, CPU)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise GPTForgeError(f"{directory}: not a directory; expected a gptforge checkpoint with {WEIGHTS} and {CONFIG}")
    meta = read_config(directory)
    config = GPTConfig.from_dict({**meta["model"], **config_overrides})
    model = GPT(config)
    state = load_state_checked(directory / WEIGHTS, model)
    model.load_state_dict(state, strict=False)  # strict=False: the tied head is not stored
    return model


def is_model_dir(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / WEIGHTS).is_file() and (d / CONFIG).is_file()


def newest_model_dir(run_dir: str | Path) -> Path | None:
    """The newest RUN_DIR/checkpoints/step_N (by step number) that holds a complete model."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return None
    steps = []
    for d in ckpts.iterdir():
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and is_model_dir(d):  # an interrupted save never has the final name
            steps.append((int(m.group(1)), d))
    return max(steps)[1] if steps else None


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory as is; a run directory -> its newest complete checkpoint."""
    path = Path(path)
    if is_model_dir(path):
        return path
    if not path.is_dir():
        raise GPTForgeError(f"{path}: no such checkpoint or run directory")
    newest = newest_model_dir(path)
    if newest is None:
        raise GPTForgeError(
            f"{path}: neither a checkpoint ({WEIGHTS} + {CONFIG}) nor a run directory "
            f"with a complete checkpoints/step_* inside"
        )
    return newest
