"""Hugging Face interop: read HF checkpoints into a GPT, write a GPT as an HF directory; the
modern model as Qwen3 / Llama goes through the same functions (its names: gptforge.hf_modern).

Our parameter names are HF's (`transformer.h.N.attn.c_attn.weight`, ...), so both directions
are one loop with two differences: HF's Conv1D stores Linear weights as (in, out), so c_attn,
c_proj and c_fc weights are transposed; and HF checkpoints carry non-parameter buffers
(`attn.bias`, `attn.masked_bias`) that are skipped. Every tensor's shape is checked.

`transformers` is never imported here: reading and writing the files needs only safetensors and
torch. The hub branch (`load_pretrained("gpt2")`) uses `huggingface_hub` when it is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge import arch, checkpoint, hf_modern
from gptforge.arch import Config, Model
from gptforge.errors import GPTForgeError
from gptforge.fsutil import atomic_dir
from gptforge.model import GPT, GPTConfig

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's, under openai-community/
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights
EOT_ID = 50256
EOT_TEXT = "<|endoftext|>"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# GPTConfig fields a caller may change when loading pretrained weights; the rest is the checkpoint's
LOAD_OVERRIDES = ("pad_vocab", "dropout", "attention", "block_size")


# ---------------------------------------------------------------------------------------------
# where the weights are


def resolve_source(source: str | os.PathLike) -> Path:
    """A directory holding a model. A run directory (with `checkpoints/step_*`) resolves to its
    newest complete checkpoint, by step number."""
    path = Path(source)
    if (path / "checkpoints").is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        return checkpoint.resolve_model_dir(path)
    return path


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


# ---------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GPTForgeError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise GPTForgeError(f"{path}: expected a JSON object")
    return data


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as e:
        raise GPTForgeError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from e
    except Exception as e:  # torch.load's weights_only unpickler refuses anything but tensors
        raise GPTForgeError(f"{path}: refused by torch.load(weights_only=True) ({type(e).__name__}: {e})") from e
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
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_one(directory / shard))
            return state
    raise GPTForgeError(f"{directory}: no weights found (expected model.safetensors or pytorch_model.bin)")


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """The GPTConfig of an HF GPT-2 config.json; variants GPT-2 does not have are refused."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GPTForgeError(f"{where}: model_type is {hf.get('model_type')!r}; only 'gpt2' (GPT-2) and, "
                            "for the modern model, 'qwen3' and 'llama' checkpoints can be loaded")
    problems = []
    for key in ("n_embd", "n_layer", "n_head", "vocab_size"):
        if not isinstance(hf.get(key), int):
            problems.append(f"{key} missing or not an integer ({hf.get(key)!r})")
    n_positions = hf.get("n_positions", hf.get("n_ctx"))
    if not isinstance(n_positions, int):
        problems.append(f"n_positions missing or not an integer ({n_positions!r})")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} (GPT-2 uses gelu_new)")
    if hf.get("n_inner") not in (None, 4 * (hf.get("n_embd") or 0)):
        problems.append(f"n_inner {hf['n_inner']} (GPT-2's MLP is 4 * n_embd)")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or not eps > 0:
        problems.append(f"layer_norm_epsilon {eps!r} (expected a positive number)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        problems.append("non-standard attention scaling (scale_attn_by_inverse_layer_idx / scale_attn_weights)")
    if hf.get("add_cross_attention"):
        problems.append("cross-attention layers (add_cross_attention)")
    if problems:
        raise GPTForgeError(f"{where}: not a plain GPT-2: " + "; ".join(problems))
    return GPTConfig(
        block_size=n_positions,
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        dropout=0.0,  # inference by default; pass dropout= to fine-tune
        norm_eps=float(eps),
    )


def _hf_to_native(state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """Rename HF tensors to ours, transpose Conv1D weights, check every shape against `config`."""
    expected = {k: tuple(v.shape) for k, v in _shapes_model(config).items() if k != checkpoint.TIED}
    native: dict[str, torch.Tensor] = {}
    unexpected = []
    lm_head = None
    for hf_name, tensor in state.items():
        if BUFFERS.search(hf_name):
            continue
        if hf_name == "lm_head.weight":
            lm_head = tensor
            continue
        name = hf_name if hf_name.startswith("transformer.") else "transformer." + hf_name
        if name not in expected:
            unexpected.append(hf_name)
            continue
        conv1d = name.endswith(CONV1D)
        want = expected[name][::-1] if conv1d else expected[name]  # the shape as HF stores it
        if tuple(tensor.shape) != want:
            raise GPTForgeError(f"{where}: tensor {hf_name} has shape {tuple(tensor.shape)}, expected {want} for {_describe(config)}")
        native[name] = tensor.t().contiguous() if conv1d else tensor
    missing = sorted(set(expected) - set(native))
    if missing or unexpected:
        raise GPTForgeError(
            f"{where}: tensors do not match a GPT-2 of {_describe(config)}: missing {missing[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    wte = native["transformer.wte.weight"]
    if lm_head is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head, wte)):
        raise GPTForgeError(f"{where}: lm_head.weight differs from transformer.wte.weight; gptforge's GPT-2 ties them")
    return native


def _describe(c: GPTConfig) -> str:
    return f"n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, vocab_size={c.vocab_size}, block_size={c.block_size}"


def _shapes_model(config: GPTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return GPT(config).state_dict()


def _adapt(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
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


def _build(config: Config, state: dict[str, torch.Tensor], where: str) -> Model:
    model = arch.build_model(config)
    state = _adapt(state, config)
    checkpoint.check_state_matches(state, model, where)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)  # tied head not stored
    return model.eval()


def _apply_overrides(config: Config, overrides: dict, where: str) -> Config:
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
    return arch.replace(config, **overrides)


def locate(source: str | os.PathLike) -> Path:
    """The directory whose config.json and weights `load_pretrained(source)` reads: a local
    directory (a run directory -> its newest complete checkpoint), or a hub name's snapshot
    (downloaded when online)."""
    path = resolve_source(source)
    if not path.exists():
        if str(source) in HUB_MODELS:
            return _hub_download(str(source))
        raise GPTForgeError(
            f"{source}: no such directory (expected a gptforge checkpoint, a run directory, a Hugging Face "
            f"GPT-2 directory, or one of the hub names {', '.join(HUB_MODELS)})"
        )
    if not path.is_dir():
        raise GPTForgeError(f"{path}: not a directory")
    return path


def _read_meta(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise GPTForgeError(f"{path}: no config.json (expected a gptforge checkpoint or a Hugging Face GPT-2 directory)")
    return _read_json(path / "config.json")


def source_config(source: str | os.PathLike) -> Config:
    """The architecture stored at `source` (what load_pretrained builds without overrides),
    read from its config.json alone: no weights are loaded."""
    path = locate(source)
    meta = _read_meta(path)
    if isinstance(meta.get("model"), dict):  # gptforge's native format
        return arch.config_from_dict(checkpoint.read_config(path)["model"])
    if hf_modern.is_modern_hf(meta):  # Qwen3 / Llama: the modern model
        return hf_modern.config_from_hf(meta, str(path / "config.json"))
    return config_from_hf(meta, str(path / "config.json"))


def tokenizer_of(source: str | os.PathLike):
    """The tokenizer of the model at `source` (as `load_pretrained` locates it): a gptforge
    checkpoint's own (checkpoint.model_tokenizer); in a Hugging Face directory, the
    gptforge-tokenizer.json an export wrote beside it, else GPT-2's for a 50257-token vocabulary."""
    from gptforge import tokenizer as tk

    path = locate(source)
    meta = _read_meta(path)
    if isinstance(meta.get("model"), dict):
        return checkpoint.model_tokenizer(path, checkpoint.read_config(path))
    if (path / tk.TOKENIZER_FILE).is_file():
        return tk.Tokenizer.load(path / tk.TOKENIZER_FILE)
    if meta.get("vocab_size") == tk.N_VOCAB:
        return tk.Tokenizer()
    raise GPTForgeError(f"{path}: no {tk.TOKENIZER_FILE}, and its vocabulary ({meta.get('vocab_size')}) is not "
                        "GPT-2's: which tokenizer its ids mean is unknown")


def load_pretrained(source: str | os.PathLike, **overrides) -> Model:
    """A GPT from a gptforge checkpoint directory, a run directory (its newest checkpoint), a local
    Hugging Face GPT-2 directory, or a hub name (gpt2 ... gpt2-xl, needs network). Overrides:
    pad_vocab, dropout, attention, block_size (a crop). Weights are fp32 on the CPU, eval mode."""
    path = locate(source)
    meta = _read_meta(path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(meta.get("model"), dict):  # gptforge's native format
        if not overrides:
            return checkpoint.load_model(path).eval()
        meta = checkpoint.read_config(path)
        where = str(path / checkpoint.WEIGHTS)
        base = arch.config_from_dict(meta["model"])
        config = _apply_overrides(base, overrides, str(path))
        try:
            state = load_file(str(path / checkpoint.WEIGHTS))
        except FileNotFoundError as e:
            raise GPTForgeError(f"{where}: not found") from e
        except (SafetensorError, OSError, ValueError) as e:
            raise GPTForgeError(f"{where}: not a readable safetensors file ({e})") from e
        return _build(config, state, where)
    if hf_modern.is_modern_hf(meta):  # Qwen3 / Llama: the modern model
        base = hf_modern.config_from_hf(meta, str(path / "config.json"))
        config = _apply_overrides(base, overrides, str(path))
        state = hf_modern.hf_to_native(read_hf_weights(path), base, str(path))
        return _build(config, state, str(path))
    base = config_from_hf(meta, str(path / "config.json"))
    config = _apply_overrides(base, overrides, str(path))
    state = _hf_to_native(read_hf_weights(path), base, str(path))
    return _build(config, state, str(path))


# ---------------------------------------------------------------------------------------------
# writing


def check_exportable(c: GPTConfig) -> None:
    """One error naming every key that keeps `c` from being a GPT-2."""
    gpt2 = dict(norm="layernorm", mlp="gelu", tie_embeddings=True, qk_norm=False, softcap=0.0)
    wrong = [f"model.{k}={getattr(c, k)} (to {v})" for k, v in gpt2.items() if getattr(c, k) != v]
    if wrong:
        raise GPTForgeError("not exportable to Hugging Face (GPT-2 does not compute it): change "
                            + ", ".join(wrong) + " and train (or fine-tune) with those")


def hf_config(config: GPTConfig, dtype: torch.dtype = torch.float32, eot_id: int = EOT_ID) -> dict:
    """config.json of a transformers GPT2LMHeadModel with this architecture (<|endoftext|> = eot_id)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF's layout: Conv1D weights transposed, the vocabulary unpadded, the tied
    head stored once (as transformers itself saves it), zero biases where the model has none."""
    c = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != checkpoint.TIED}
    state["transformer.wte.weight"] = state["transformer.wte.weight"][: c.vocab_size]
    if not c.bias:  # a missing bias is a zero bias: GPT-2 always has them
        for name, tensor in list(state.items()):
            if name.endswith(CONV1D) or ".ln_" in name:  # LayerNorm and Linear weights
                bias = name[: -len("weight")] + "bias"
                state.setdefault(bias, tensor.new_zeros(tensor.size(0)))
    return {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state.items()}


def write_tokenizer_files(directory: Path, model_max_length: int) -> None:
    """GPT-2's tokenizer files for transformers, from the same local BPE data as gptforge.tokenizer:
    encoder.json is vocab.json, vocab.bpe is merges.txt."""
    from gptforge.tokenizer import bpe_files, get_encoding

    get_encoding()  # hash-checks the files (or finds tiktoken's cache) before we copy them
    vocab_bpe, encoder_json = bpe_files()
    shutil.copyfile(encoder_json, directory / "vocab.json")
    shutil.copyfile(vocab_bpe, directory / "merges.txt")
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    token = {"content": EOT_TEXT, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": True}
    tok_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "added_tokens_decoder": {str(EOT_ID): token},
        **special,
    }
    _write_json(directory / "tokenizer_config.json", tok_config)
    _write_json(directory / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export_hf(model_or_ckpt_dir: GPT | str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
              tokenizer=None) -> Path:
    """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` and `AutoTokenizer`
    load offline: config.json, model.safetensors, generation_config.json and the model's
    tokenizer: GPT-2's files, or a trained tokenizer's tokenizer.json (the same ids as gptforge)
    with its gptforge-tokenizer.json (so gptforge reads the export back with it). The tokenizer is
    the checkpoint's; for a GPT given directly, `tokenizer` (default: GPT-2's for its 50257-token
    vocabulary). Atomic: OUT appears complete or not at all."""
    from gptforge import tokenizer as tk

    if arch.is_model(model_or_ckpt_dir):
        model = model_or_ckpt_dir
        if tokenizer is None and model.config.vocab_size == tk.N_VOCAB:
            tokenizer = tk.Tokenizer()
    else:
        model = load_pretrained(model_or_ckpt_dir)
        tokenizer = tokenizer or tokenizer_of(model_or_ckpt_dir)
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise GPTForgeError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids, the model's vocabulary "
                            f"{model.config.vocab_size}: they do not belong together")
    eot = tokenizer.eot_id if tokenizer is not None else EOT_ID
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise GPTForgeError(f"{out} already exists (pass --overwrite to replace it)")
    c = model.config
    if not c.rope:  # learned positions: GPT-2
        check_exportable(c)
        state = hf_state_dict(model)
        config_json = hf_config(c, state["transformer.wte.weight"].dtype, eot)
    else:  # the modern model: as Qwen3 (or Llama without QK-norm); refused if no HF architecture computes it
        state = hf_modern.hf_state_dict(model)
        config_json = hf_modern.hf_config(c, state["model.embed_tokens.weight"].dtype, eot)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config_json)
        _write_json(tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
        if tokenizer is not None and tokenizer.trained:
            for name, data in tokenizer.hf_files(c.block_size).items():
                (tmp / name).write_bytes(data)
            (tmp / tk.TOKENIZER_FILE).write_bytes(tokenizer.file_bytes())
        elif tokenizer is not None:
            write_tokenizer_files(tmp, c.block_size)

    if not out.exists():
        with atomic_dir(out) as tmp:
            write(tmp)
        return out
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        with atomic_dir(out) as tmp:
            write(tmp)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
