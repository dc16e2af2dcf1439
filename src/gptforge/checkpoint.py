"""The native model format: a directory with `model.safetensors` and `config.json`.

Every later piece builds on it: training checkpoints add a `state.pt` (see train/checkpoint.py),
`gptforge sample`, `eval` and `export` read it. Weights are safetensors (never pickle); the tied
LM head is stored once, as `transformer.wte.weight`.

Every directory written here also holds `SHA256SUMS` (the sha256 of each of its files, in the
format of coreutils' `sha256sum`, written last inside the atomic directory), and every read checks
the files it uses against it: `read_config` (the first step of every reader: load_model, resume,
`GPT.from_pretrained` / gptforge.interop) checks config.json and model.safetensors, `load_state_checked` the
weights, train/checkpoint.py's `load_train_state` state.pt. A directory written before the sums
existed loads with a note.

The tokenizer travels with the weights: config.json's `tokenizer` names it (name, vocabulary
size, and for a trained one the sha256 of its file), and a trained tokenizer's
gptforge-tokenizer.json is written beside the weights (so SHA256SUMS covers it too).
`model_tokenizer` reads it back; a directory with no record (written before tokenizers were
recorded) is GPT-2's when its vocabulary is 50257.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge import __version__
from gptforge.errors import GPTForgeError
from gptforge import fsutil
from gptforge.fsutil import replace_dir, sha256_file
from gptforge.model import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TIED = "lm_head.weight"  # when tied (GPT-2; modern with tie_embeddings): wte's storage, not stored twice
SUMS = "SHA256SUMS"  # `cd DIR && sha256sum -c SHA256SUMS` checks a checkpoint without gptforge


class ChecksumError(GPTForgeError):
    """A file of a checkpoint is not what was written: its sha256 differs from SHA256SUMS."""


def write_sums(directory: Path) -> None:
    """SHA256SUMS of every file in `directory`; call it last, inside the writer's atomic_dir."""
    def hash_all(files):
        with ThreadPoolExecutor(max(len(files), 1)) as ex:  # hashlib releases the GIL
            return list(ex.map(sha256_file, files))

    fsutil.write_sums(directory, hasher=hash_all)


def read_sums(directory: Path) -> dict[str, str] | None:
    """file name -> sha256 from SHA256SUMS; None when the directory has none (written before sums)."""
    return fsutil.read_sums(directory, ChecksumError)


_NOTED: set[str] = set()


def _note_unverified(directory: Path) -> None:
    key = str(Path(directory).resolve())
    if key in _NOTED:
        return
    _NOTED.add(key)
    if os.environ.get("RANK", "0") == "0":  # one printer under torchrun
        print(f"gptforge: note: {directory} has no {SUMS} (written before checkpoints were checksummed); "
              "loading it unverified", file=sys.stderr)


def verify_files(directory: str | Path, names: tuple[str, ...]) -> None:
    """Check `names` of a checkpoint directory against its SHA256SUMS (a ChecksumError naming the
    file and both digests). Files that are absent are left to the reader to report."""
    directory = Path(directory)
    sums = read_sums(directory)
    if sums is None:
        if any((directory / name).is_file() for name in names):
            _note_unverified(directory)
        return
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        want = sums.get(name)
        if want is None:
            raise ChecksumError(f"{path}: not listed in {directory / SUMS}; the directory was changed after it was written")
        got = sha256_file(path)
        if got != want:
            raise ChecksumError(
                f"{path}: sha256 is {got}, but {SUMS} recorded {want} when it was written "
                "(the file changed since: a flipped bit, a bad copy or disk)"
            )


def verify_dir(directory: str | Path) -> None:
    """Every file SHA256SUMS lists must be present and match (the check `--resume auto` makes)."""
    directory = Path(directory)
    sums = read_sums(directory)
    if sums is None:
        _note_unverified(directory)
        return
    for name in sums:
        if not (directory / name).is_file():
            raise ChecksumError(f"{directory / name}: listed in {SUMS} but missing")
    verify_files(directory, tuple(sums))


def stored_keys(model: GPT) -> dict[str, torch.Size]:
    """name -> shape of every tensor a model file holds: the state dict less a tied head."""
    skip = TIED if model.tied else None
    return {k: v.shape for k, v in model.state_dict().items() if k != skip}


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """CPU, contiguous state dict without a tied duplicate and without non-persistent buffers
    (an untied head is saved: it is a Parameter of its own)."""
    skip = TIED if model.tied else None
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != skip}


def write_model_files(directory: Path, state: dict[str, torch.Tensor], config: GPTConfig, extra: dict | None = None,
                      tokenizer=None) -> None:
    """Write model.safetensors + config.json (+ the tokenizer: its record in config.json, a trained
    one's file beside them) into an existing directory (callers make it atomic)."""
    directory = Path(directory)
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})  # one key: byte-reproducible
    meta = {"gptforge_version": __version__, "model": config.to_dict(), **(extra or {})}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.identity()
        if tokenizer.trained:
            from gptforge.tokenizer import TOKENIZER_FILE

            (directory / TOKENIZER_FILE).write_bytes(tokenizer.file_bytes())
    (directory / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def model_tokenizer(directory: str | Path, meta: dict | None = None, required: bool = True):
    """The tokenizer of a model directory (see the module doc), checked against SHA256SUMS and
    config.json's record. Not required: None for a directory that names none (a model saved with
    no tokenizer whose vocabulary is not GPT-2's)."""
    from gptforge import tokenizer as tk

    directory = Path(directory)
    meta = meta if meta is not None else read_config(directory)
    record = meta.get("tokenizer")
    if record is None and isinstance(meta.get("train"), dict):  # a training checkpoint of an older gptforge
        record = (meta["train"].get("resolved") or {}).get("tokenizer")
    vocab = (meta.get("model") or {}).get("vocab_size")
    if record is None:
        if vocab == tk.N_VOCAB:
            return tk.Tokenizer()
        if not required:
            return None
        raise GPTForgeError(f"{directory / CONFIG}: names no tokenizer, and its vocabulary ({vocab}) is not GPT-2's")
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise GPTForgeError(f"{directory / CONFIG}: field 'tokenizer' must be an object with a name, got {record!r:.80}")
    if record["name"] == tk.NAME:
        return tk.Tokenizer()
    path = directory / tk.TOKENIZER_FILE
    verify_files(directory, (tk.TOKENIZER_FILE,))
    tok = tk.Tokenizer.load(path, sha256=record.get("sha256"), where=str(directory / CONFIG))
    if tok.name != record["name"]:
        raise GPTForgeError(f"{path}: is tokenizer {tok.name}, but {directory / CONFIG} names {record['name']}")
    return tok


def save_model(model: GPT, directory: str | Path, extra: dict | None = None, overwrite: bool = False,
               tokenizer=None, inputs=()) -> Path:
    """Save atomically: the directory appears complete or not at all. With `overwrite` only a
    model directory (not a training checkpoint, not anything else) is replaced; an output that
    is, contains or is inside one of `inputs` is refused (fsutil.replace_dir)."""
    def write(tmp: Path) -> None:
        write_model_files(tmp, model_state_for_saving(model), model.config, extra, tokenizer)
        write_sums(tmp)

    return replace_dir(directory, write, "gptforge model", is_saved_model_dir, inputs=inputs, overwrite=overwrite)


def is_saved_model_dir(directory: Path) -> bool:
    """A model directory as save_model writes it: weights and config, no training state (a
    training checkpoint is never replaced by an import)."""
    return is_model_dir(directory) and not (Path(directory) / "state.pt").exists()


def is_hf_dir(directory: Path) -> bool:
    """A Hugging Face model directory (as `export --to-hf` writes it): a config.json naming a
    model_type, and not a gptforge checkpoint."""
    try:
        meta = json.loads((Path(directory) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "model" not in meta and not (Path(directory) / "state.pt").exists()


def read_config(directory: str | Path) -> dict:
    """config.json of a model directory, after checking it and the weights against SHA256SUMS:
    every reader starts here, so none loads a changed file without a word."""
    path = Path(directory) / CONFIG
    verify_files(path.parent, (CONFIG, WEIGHTS))
    try:
        meta = fsutil.read_json(path)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found; a gptforge checkpoint directory holds {WEIGHTS} and {CONFIG}") from e
    if not isinstance(meta.get("model"), dict):
        raise GPTForgeError(f"{path}: missing the 'model' section (a GPTConfig)")
    model_config(meta, path)
    return meta


_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def model_config(meta: dict, path: Path) -> GPTConfig:
    """The architecture of a config.json's `model` section; a field of the wrong type or an
    impossible value is one line naming the file and the field."""
    section = meta["model"]
    for f in dataclasses.fields(GPTConfig):
        if f.name not in section:
            continue
        value, want = section[f.name], _JSON_TYPES.get(str(f.type), (object,))
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
            raise GPTForgeError(f"{path}: field 'model.{f.name}' must be {f.type}, got {value!r:.80}")
    try:
        return GPTConfig.from_dict(section)
    except (GPTForgeError, TypeError, ValueError) as e:
        raise GPTForgeError(f"{path}: field 'model' is not a valid architecture: {e}") from e


def check_weights_header(path: Path, config: GPTConfig) -> None:
    """The tensor names and shapes in a safetensors file's header against the model `config`
    describes, before that model is built (on the meta device: nothing is allocated). A
    config.json that claims a far bigger model than its weights is one line, not an allocator
    failure."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise GPTForgeError(f"{path}: not a readable safetensors file ({one_line(e)})") from e
    with torch.device("meta"):
        model = GPT(config)
    c = config
    try:
        check_shapes(shapes, model, str(path))
    except GPTForgeError as e:
        raise GPTForgeError(f"{e} (the config says n_layer {c.n_layer}, n_head {c.n_head}, n_embd {c.n_embd}, "
                            f"vocab_size {c.vocab_size}, block_size {c.block_size}: it does not describe these weights)") from None


def one_line(e: BaseException) -> str:
    """The one sentence of a long, multi-line library message (torch.load's advice on
    weights_only, say) that says what went wrong."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours part of it
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            text = line.split("WeightsUnpickler error:", 1)[1]
            break
    text = " ".join(text.split())
    text = text.split(". ")[0].strip().rstrip(".")
    return text[:200] or type(e).__name__


def field_problems(d: dict, positive: tuple[str, ...] = (), floats: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with the fields of a JSON object we read: `positive` ones must be positive
    integers (not booleans), `floats` (when present) numbers."""
    problems = []
    for key in positive:
        value = d.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key} missing or not a positive integer ({value!r:.40})")
    for key in floats:
        value = d.get(key)
        if key in d and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            problems.append(f"{key} is not a number ({value!r:.40})")
    return problems


def load_state_checked(path: Path, model: GPT) -> dict[str, torch.Tensor]:
    """Read a safetensors file (checked against its directory's SHA256SUMS) and check every name
    and shape against `model`."""
    verify_files(Path(path).parent, (Path(path).name,))
    try:
        state = load_file(str(path))
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise GPTForgeError(f"{path}: not a readable safetensors file ({e})") from e
    check_state_matches(state, model, str(path))
    return state


def check_state_matches(state: dict[str, torch.Tensor], model: GPT, where: str) -> None:
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, model, where)


def check_shapes(state: dict[str, tuple], model: GPT, where: str) -> None:
    """name -> shape of a weights file against the tensors `model` stores."""
    expected = stored_keys(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - ({TIED} if model.tied else set()))
    if missing or unexpected:
        raise GPTForgeError(f"{where}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if tuple(state[k]) != tuple(shape):
            raise GPTForgeError(
                f"{where}: tensor {k} has shape {tuple(state[k])}, the model expects {tuple(shape)}"
            )


def load_model(directory: str | Path, **config_overrides) -> GPT:
    """Build the model described by config.json and load its weights (fp32, CPU)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise GPTForgeError(f"{directory}: not a directory; expected a gptforge checkpoint with {WEIGHTS} and {CONFIG}")
    meta = read_config(directory)
    config = GPTConfig.from_dict({**meta["model"], **config_overrides})
    check_weights_header(directory / WEIGHTS, config)
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
