"""Stage 2 of `prepare`: parts -> shards, and the manifest that describes them.

The token stream is split into val = its first `val_end` tokens and train = the rest, and each
split into `{split}_{index:06d}.npy` shards of `shard_tokens` tokens (the last one shorter), copied
from the parts in bounded blocks (a part is deleted once every shard that needs it exists).
Shards already present (written before an interruption) are only hashed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from gptforge import tokenizer as tk
from gptforge.data import shards
from gptforge.data.parts import bar_interval, eot_of, load_part, part_path
from gptforge.errors import GPTForgeError

TOKENIZER_DIR = "tokenizer"  # a trained tokenizer's directory inside the data directory
VAL_RULE = ("first whole documents until >= min(10M, max(ceil(0.5% of all tokens), min(32,769, ceil(10% of all "
            "tokens)))), never every document; cut inside a document when whole ones would give less than that "
            "or more than twice it (targets >= 1,024 tokens)")


def _blocks(parts: Path, starts: np.ndarray, sizes: list[int], a: int, b: int) -> Iterator[np.ndarray]:
    """Tokens [a, b) of the stream, read from the parts in bounded blocks."""
    i = int(np.searchsorted(starts, a, side="right")) - 1
    pos = a
    while pos < b:
        arr = load_part(parts, i)
        lo, hi = pos - int(starts[i]), min(b, int(starts[i]) + sizes[i]) - int(starts[i])
        for j in range(lo, hi, shards._BLOCK):
            yield arr[j : min(hi, j + shards._BLOCK)]
        pos += hi - lo
        del arr
        i += 1


def cut(out: Path, parts: Path, layout: dict, options: dict, tok: tk.Tokenizer, progress: bool) -> dict:
    """Write the shards into `out` and return the manifest (not yet written)."""
    sizes = layout["parts"]
    eot, dtype = eot_of(options), shards.token_dtype(options["vocab_size"])
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total, vb, n = int(starts[-1]), layout["val_end"], options["shard_tokens"]
    plan = [
        (split, i, s, min(hi, s + n))
        for split, lo, hi in (("val", 0, vb), ("train", vb, total))
        for i, s in enumerate(range(lo, hi, n))
    ]
    entries: dict[str, list[dict]] = {"val": [], "train": []}
    bar = tqdm(total=total, desc="writing shards", unit=" tok", unit_scale=True, disable=not progress, mininterval=bar_interval())
    with bar:
        for split, i, a, b in plan:
            path = out / shards.shard_name(split, i)
            if path.exists():  # written (atomically) before an interruption
                entry = shards.shard_entry(path, eot)
                if entry["num_tokens"] != b - a:
                    raise GPTForgeError(f"{path}: {entry['num_tokens']} tokens, expected {b - a}; pass --overwrite to start again")
            else:
                entry = shards.write_shard(path, _blocks(parts, starts, sizes, a, b), b - a, dtype, eot)
            entries[split].append(entry)
            bar.update(b - a)
            for j in range(len(sizes)):  # parts every remaining shard lies beyond
                if starts[j + 1] <= b:
                    with contextlib.suppress(FileNotFoundError):
                        part_path(parts, j).unlink()
    st = layout["stats"]
    val_docs = layout["val_documents"]
    named = {}
    if tok.trained:  # stored with the data: the manifest names the file and its sha256
        named = {"tokenizer_file": f"{TOKENIZER_DIR}/{tk.TOKENIZER_FILE}", "tokenizer_sha256": tok.file_sha256,
                 "tokenizer_pattern": tok.pattern_name}
    return {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "tokenizer": tok.name,
        **named,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "shard_tokens": n,
        "splits": {
            "val": {"num_tokens": vb, "num_documents": val_docs, "shards": entries["val"]},
            "train": {"num_tokens": total - vb, "num_documents": layout["documents"] - val_docs, "shards": entries["train"]},
        },
        "documents": {**st, "val": val_docs, "train": layout["documents"] - val_docs},
        "val_rule": VAL_RULE if options["val_tokens"] == "auto" else "first whole documents until >= val_tokens",
        "val_target": layout["val_target"],
        "sources": options["sources"],
        "options": options,
    }
