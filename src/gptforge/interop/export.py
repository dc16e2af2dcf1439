"""Export to Hugging Face: the model as the format whose adapter computes it (GPT-2, Qwen3 or
Llama; any other model as gptforge's own modeling file, loaded with trust_remote_code), with its
tokenizer, in a directory transformers loads offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType

from safetensors.torch import save_file

from gptforge.errors import GPTForgeError
from gptforge.checkpoint import is_hf_dir
from gptforge.fsutil import replace_dir
from gptforge.interop.load import ADAPTERS, open_source
from gptforge.model import GPT, GPTConfig

EOT_ID = 50256
EOT_TEXT = "<|endoftext|>"


def adapter_for(c: GPTConfig) -> ModuleType:
    """The first adapter that computes `c`: a built-in transformers architecture where one does,
    else gptforge's own modeling file (interop.remote, last, computes every model). The error
    naming what to change for the nearest format is for an adapter table without that fallback."""
    found = sorted(((adapter.problems(c), i) for i, adapter in enumerate(ADAPTERS)), key=lambda t: (len(t[0]), t[1]))
    wrong, i = found[0]
    if wrong:
        raise GPTForgeError(f"not exportable to Hugging Face (nearest format: {ADAPTERS[i].NAME}): change "
                            + ", ".join(wrong) + " and train (or fine-tune) with those")
    return ADAPTERS[i]


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
              tokenizer=None, inputs=()) -> Path:
    """Write a directory that transformers' `AutoModelForCausalLM` (GPT-2, or Qwen3 / Llama: the
    format whose adapter computes the model; else with trust_remote_code=True, gptforge's model.py
    and its wrappers copied in: see interop.remote) and `AutoTokenizer` load offline: config.json, model.safetensors, generation_config.json and the model's
    tokenizer: GPT-2's files, or a trained tokenizer's tokenizer.json (the same ids as gptforge)
    with its gptforge-tokenizer.json (so gptforge reads the export back with it). The tokenizer is
    the checkpoint's; for a GPT given directly, `tokenizer` (default: GPT-2's for its 50257-token
    vocabulary). Atomic: OUT appears complete or not at all; with `overwrite` only an HF model
    directory is replaced, and an OUT that is, contains or is inside the source (or `inputs`) is
    refused (fsutil.replace_dir)."""
    from gptforge import tokenizer as tk

    if isinstance(model_or_ckpt_dir, GPT):
        model = model_or_ckpt_dir
        if tokenizer is None and model.config.vocab_size == tk.N_VOCAB:
            tokenizer = tk.Tokenizer()
    else:
        source = open_source(model_or_ckpt_dir)
        model = source.load()
        tokenizer = tokenizer or source.tokenizer()
    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise GPTForgeError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids, the model's vocabulary "
                            f"{model.config.vocab_size}: they do not belong together")
    eot = tokenizer.eot_id if tokenizer is not None else EOT_ID
    out = Path(out_dir)
    c = model.config
    adapter = adapter_for(c)
    state, config_json = adapter.weights_out(model, eot)
    code = adapter.code_files() if hasattr(adapter, "code_files") else {}  # trust_remote_code: the modeling files

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config_json)
        _write_json(tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
        for name, data in code.items():
            (tmp / name).write_bytes(data)
        if tokenizer is not None and tokenizer.trained:
            for name, data in tokenizer.hf_files(c.block_size).items():
                (tmp / name).write_bytes(data)
            (tmp / tk.TOKENIZER_FILE).write_bytes(tokenizer.file_bytes())
        elif tokenizer is not None:
            write_tokenizer_files(tmp, c.block_size)

    sources = [*inputs] if isinstance(model_or_ckpt_dir, GPT) else [*inputs, Path(model_or_ckpt_dir), source.path]
    return replace_dir(out, write, "Hugging Face model", is_hf_dir, inputs=sources, overwrite=overwrite)
