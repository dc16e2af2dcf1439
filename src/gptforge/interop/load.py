"""The one loader of everything a user can point at: a gptforge checkpoint directory, a run
directory (its newest complete checkpoint), a Hugging Face directory of a format an adapter
recognises (gptforge.interop.gpt2, .qwen3, .nanochat), or a hub name (gpt2 ... gpt2-xl, downloaded when
online). `open_source` locates the source once and reads its config.json once; its config,
tokenizer and model all come from that reading.

`transformers` is never imported here: reading the files needs only safetensors and torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptforge import checkpoint
from gptforge.errors import GPTForgeError
from gptforge.fsutil import inside, read_json
from gptforge.interop import gpt2, nanochat, qwen3, remote
from gptforge.model import GPT, GPTConfig

# one module per outside format, the same functions; export takes the first that computes a model,
# so remote (our own modeling file, which computes every model) stays last
ADAPTERS: tuple[ModuleType, ...] = (gpt2, qwen3, nanochat, remote)
HUB_MODELS = gpt2.HUB_MODELS
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# GPTConfig fields a caller may change when loading pretrained weights; the rest is the source's
LOAD_OVERRIDES = ("pad_vocab", "dropout", "attention", "block_size")


def resolve_source(source: str | os.PathLike) -> Path:
    """A directory holding a model. A run directory (with `checkpoints/step_*`) resolves to its
    newest complete checkpoint, by step number."""
    path = Path(source)
    if (path / "checkpoints").is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        return checkpoint.resolve_model_dir(path)
    return path


def locate(source: str | os.PathLike) -> Path:
    """The directory whose config.json and weights `source` names: a local directory (a run
    directory -> its newest complete checkpoint), or a hub name's snapshot (downloaded when online)."""
    path = resolve_source(source)
    if not path.exists():
        if str(source) in HUB_MODELS:
            return _hub_download(str(source))
        raise GPTForgeError(
            f"{source}: no such directory (expected a gptforge checkpoint, a run directory, a Hugging Face "
            f"GPT-2 / Qwen3 / Llama directory, or one of the hub names {', '.join(HUB_MODELS)})"
        )
    if not path.is_dir():
        raise GPTForgeError(f"{path}: not a directory")
    return path


@dataclass(frozen=True)
class Source:
    """A located model: its directory, its config.json (read once) and, for a Hugging Face
    directory, the adapter of its format (None: gptforge's native format)."""

    path: Path
    meta: dict
    adapter: ModuleType | None

    @property
    def config(self) -> GPTConfig:
        """The architecture stored here (what `load` builds without overrides); no weights are read."""
        if self.adapter is None:  # a field of the wrong type: one line naming file and field
            return checkpoint.model_config(self.meta, self.path / checkpoint.CONFIG)
        return self.adapter.config_from_hf(self.meta, str(self.path / "config.json"))

    def tokenizer(self):
        """The tokenizer of the model: a gptforge checkpoint's own (checkpoint.model_tokenizer); in a
        Hugging Face directory, the gptforge-tokenizer.json an export wrote beside it, else GPT-2's
        for a 50257-token vocabulary."""
        from gptforge import tokenizer as tk

        if self.adapter is None:
            return checkpoint.model_tokenizer(self.path, self.meta)
        if (self.path / tk.TOKENIZER_FILE).is_file():
            return tk.Tokenizer.load(self.path / tk.TOKENIZER_FILE)
        if self.meta.get("vocab_size") == tk.N_VOCAB:
            return tk.Tokenizer()
        raise GPTForgeError(f"{self.path}: no {tk.TOKENIZER_FILE}, and its vocabulary ({self.meta.get('vocab_size')}) is "
                            "not GPT-2's: which tokenizer its ids mean is unknown")

    def load(self, **overrides) -> GPT:
        """The model, fp32 on the CPU, eval mode. Overrides: pad_vocab, dropout, attention,
        block_size (a crop); None values are ignored."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        base = self.config
        config = _apply_overrides(base, overrides, str(self.path))
        if self.adapter is None:
            where = self.path / checkpoint.WEIGHTS
            checkpoint.verify_files(self.path, (checkpoint.WEIGHTS,))
            checkpoint.check_weights_header(where, base)  # before anything is allocated
            state = _read_one(where)
        else:
            where = self.path
            state = self.adapter.weights_in(read_hf_weights(self.path), base, str(self.path))
        return _build(config, state, str(where))


def open_source(source: str | os.PathLike) -> Source:
    """Locate `source` and read its config.json (checked against SHA256SUMS in a gptforge checkpoint)."""
    path = locate(source)
    if not (path / "config.json").is_file():
        raise GPTForgeError(f"{path}: no config.json (expected a gptforge checkpoint or a Hugging Face model directory)")
    if (path / checkpoint.SUMS).is_file():  # a gptforge checkpoint: checked before it is parsed
        checkpoint.verify_files(path, (checkpoint.CONFIG,))
    meta = _read_json(path / "config.json")
    if isinstance(meta.get("model"), dict):  # gptforge's native format
        if not (path / checkpoint.SUMS).is_file():
            checkpoint.verify_files(path, (checkpoint.CONFIG, checkpoint.WEIGHTS))  # the note: unverified
        return Source(path, meta, None)
    for adapter in ADAPTERS:
        if adapter.recognise(meta):
            return Source(path, meta, adapter)
    raise GPTForgeError(f"{path / 'config.json'}: model_type is {meta.get('model_type')!r}; only 'gpt2' (GPT-2), "
                        "'nanochat', 'qwen3' and 'llama' checkpoints, and gptforge's own exports ('gptforge'), can be loaded")


def load_pretrained(source: str | os.PathLike, **overrides) -> GPT:
    """A model from a gptforge checkpoint directory, a run directory (its newest checkpoint), a
    local Hugging Face GPT-2 / Qwen3 / Llama directory, or a hub name (gpt2 ... gpt2-xl, needs
    network). Overrides: pad_vocab, dropout, attention, block_size (a crop). fp32, CPU, eval mode."""
    return open_source(source).load(**overrides)


def source_config(source: str | os.PathLike) -> GPTConfig:
    """The architecture stored at `source`, read from its config.json alone."""
    return open_source(source).config


def tokenizer_of(source: str | os.PathLike):
    """The tokenizer of the model at `source` (see Source.tokenizer)."""
    return open_source(source).tokenizer()


def load(path, device: str = "cpu") -> GPT:
    """gptforge.load: a trained model in eval mode from any source load_pretrained reads."""
    return load_pretrained(path).to(device).eval()


def _hub_download(name: str) -> Path:
    """The local snapshot of a hub GPT-2 (config + weights), downloading it when online."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    need_local = (
        "pass a local directory instead (a Hugging Face GPT-2 directory with config.json and "
        "model.safetensors, or a gptforge checkpoint)"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise GPTForgeError(f"{name!r} is a hub name but huggingface_hub is not installed; {need_local}") from e
    try:
        snapshot = snapshot_download(
            repo_id=f"openai-community/{name}",
            allow_patterns=["config.json", "model.safetensors"],
            local_files_only=offline,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except Exception as e:  # offline, no network, unknown repo: all the same to the user
        why = "offline (HF_HUB_OFFLINE is set) and not in the local cache" if offline else f"download failed ({type(e).__name__})"
        raise GPTForgeError(f"cannot fetch {name!r} from the Hugging Face hub: {why}; {need_local}") from e
    return Path(snapshot)


def _read_json(path: Path) -> dict:
    try:
        return read_json(path)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise GPTForgeError(f"{path}: not a readable weights file ({type(e).__name__}: {checkpoint.one_line(e)})") from e
    except Exception as e:  # torch.load's weights_only unpickler refuses anything but tensors
        raise GPTForgeError(f"{path}: refused by torch.load(weights_only=True) ({type(e).__name__}: "
                            f"{checkpoint.one_line(e)}); a weights file holds tensors only") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GPTForgeError(f"{path}: expected a flat state dict of tensors")
    return state


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, pytorch_model.bin, or their sharded forms."""
    for single, index in (WEIGHT_FILES[:2], WEIGHT_FILES[2:]):
        if (directory / single).is_file():
            return _read_one(directory / single)
        if (directory / index).is_file():
            weight_map = _read_json(directory / index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise GPTForgeError(f"{directory / index}: field 'weight_map' must map tensor names to file names")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_one(inside(directory, shard, f"{directory / index}: weight_map")))
            return state
    raise GPTForgeError(f"{directory}: no weights found (expected model.safetensors or pytorch_model.bin)")


def _adapt(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Fit stored embeddings to `config`: pad or unpad the vocabulary rows, crop positions."""
    state = dict(state)
    wte = state.get("transformer.wte.weight")
    V = config.padded_vocab_size
    if wte is not None and wte.dim() == 2 and wte.size(0) != V and wte.size(0) >= config.vocab_size:
        if V > wte.size(0):  # padded rows are never a prediction (the model slices logits)
            wte = torch.cat([wte, wte.new_zeros(V - wte.size(0), wte.size(1))])
        state["transformer.wte.weight"] = wte[:V].contiguous()
    head = state.get(checkpoint.TIED)  # an untied head (modern) has the embedding's rows
    if head is not None and head.dim() == 2 and head.size(0) != V and head.size(0) >= config.vocab_size:
        if V > head.size(0):
            head = torch.cat([head, head.new_zeros(V - head.size(0), head.size(1))])
        state[checkpoint.TIED] = head[:V].contiguous()
    wpe = state.get("transformer.wpe.weight")
    if wpe is not None and wpe.dim() == 2 and wpe.size(0) > config.block_size:
        state["transformer.wpe.weight"] = wpe[: config.block_size].contiguous()  # crop the context
    return state


def _build(config: GPTConfig, state: dict[str, torch.Tensor], where: str) -> GPT:
    model = GPT(config)
    state = _adapt(state, config)
    checkpoint.check_state_matches(state, model, where)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)  # tied head not stored
    return model.eval()


def _apply_overrides(config: GPTConfig, overrides: dict, where: str) -> GPTConfig:
    bad = sorted(set(overrides) - set(LOAD_OVERRIDES))
    if bad:
        raise GPTForgeError(
            f"cannot override {bad} when loading {where}: the architecture is the checkpoint's; "
            f"allowed overrides: {list(LOAD_OVERRIDES)}"
        )
    if overrides.get("block_size", 0) > config.block_size:
        raise GPTForgeError(
            f"block_size override {overrides['block_size']} exceeds the checkpoint's {config.block_size} (it can only be cropped)"
        )
    return GPTConfig.from_dict({**config.to_dict(), **overrides})
