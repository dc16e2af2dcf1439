"""The shard format: token files written atomically, opened by memmap, described by manifest.json.

A prepared directory holds `{split}_{index:06d}.npy` files (split `train` or `val`), each a 1-D
numpy array of token ids (uint16, or uint32 for vocabularies over 65,536 ids), and `manifest.json`:

    {"format": "gptforge-shards", "version": 1, "tokenizer": "gpt2", "vocab_size": 50257,
     "eot_id": 50256, "dtype": "uint16", "shard_tokens": ...,
     ("tokenizer_file": "tokenizer/gptforge-tokenizer.json", "tokenizer_sha256": ...: a trained
      tokenizer, stored in the directory; "tokenizer" is then its name, e.g. "bpe4096-1a2b3c4d5e6f")
     "splits": {"val": {"num_tokens", "num_documents", "shards": [{"file", "num_tokens",
                                                                   "num_documents", "sha256"}]},
                "train": {...}},
     "documents": {...}, "sources": [...], "options": {...}}

The sha256 is of the whole .npy file. Opening checks each shard cheaply (header, dtype, shape and
file size against the manifest); `verify` reads everything (checksums, token ids < vocab size).
The manifest is written last: a directory without one is not (yet) a prepared dataset.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from gptforge import tokenizer as tk
from gptforge.errors import GPTForgeError
from gptforge.fsutil import atomic_path, read_json
from gptforge.fsutil import write_json as write_json  # the data package's name for it

MANIFEST = "manifest.json"
FORMAT = "gptforge-shards"
VERSION = 1
SPLITS = ("val", "train")
SHARD_RE = re.compile(r"^(train|val)_\d{6}\.npy$")
_BLOCK = 1 << 23  # tokens per read/write block: bounded memory for any shard size


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def npy_header(dtype: np.dtype, n: int) -> bytes:
    """The .npy header np.save would write for a 1-D array of n items."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
    )
    return buf.getvalue()


def write_shard(path: str | os.PathLike, blocks: Iterable[np.ndarray], n: int, dtype: np.dtype, eot_id: int) -> dict:
    """Stream `blocks` (n tokens in all) into a .npy at `path` atomically (temp name, fsync, rename).

    Returns the shard's manifest entry: file, num_tokens, num_documents (EOT count), sha256.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    h = hashlib.sha256()
    written = docs = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            header = npy_header(dtype, n)
            f.write(header)
            h.update(header)
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                data = block.tobytes()
                f.write(data)
                h.update(data)
                written += block.size
                docs += int(np.count_nonzero(block == eot_id))
            f.flush()
        if written != n:  # an invariant of the caller: never rename a wrong-sized shard into place
            raise AssertionError(f"{path}: wrote {written} tokens, expected {n}")
    return {"file": path.name, "num_tokens": n, "num_documents": docs, "sha256": h.hexdigest()}


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def shard_entry(path: str | os.PathLike, eot_id: int) -> dict:
    """The manifest entry of a shard already on disk (used when resuming)."""
    path = Path(path)
    arr = np.load(path, mmap_mode="r")
    docs = sum(int(np.count_nonzero(arr[i : i + _BLOCK] == eot_id)) for i in range(0, arr.shape[0], _BLOCK))
    return {"file": path.name, "num_tokens": int(arr.shape[0]), "num_documents": docs, "sha256": file_sha256(path)}


def write_manifest(data_dir: str | os.PathLike, manifest: dict) -> None:
    write_json(Path(data_dir) / MANIFEST, manifest)


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """manifest.json of a prepared directory, with its fields checked."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not data_dir.is_dir():
        raise GPTForgeError(f"{data_dir}: no such data directory (create one with gptforge prepare SOURCE... --out {data_dir})")
    try:
        manifest = read_json(path)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found; {data_dir} is not a prepared data directory (or its preparation did not finish)") from e
    if manifest.get("format") != FORMAT:
        raise GPTForgeError(f"{path}: not a gptforge shard manifest (format is not {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise GPTForgeError(f"{path}: manifest version {manifest.get('version')!r}, this gptforge reads version {VERSION}")
    for key, tp in (("tokenizer", str), ("vocab_size", int), ("eot_id", int), ("dtype", str), ("splits", dict)):
        if not isinstance(manifest.get(key), tp):
            raise GPTForgeError(f"{path}: field {key!r} missing or not a {tp.__name__}")
    for key in ("tokenizer_file", "tokenizer_sha256"):
        if key in manifest and not isinstance(manifest[key], str):
            raise GPTForgeError(f"{path}: field {key!r} is not a string")
    if ("tokenizer_file" in manifest) != ("tokenizer_sha256" in manifest):
        raise GPTForgeError(f"{path}: fields 'tokenizer_file' and 'tokenizer_sha256' go together")
    if "tokenizer_file" not in manifest and manifest["tokenizer"] != "gpt2":
        raise GPTForgeError(f"{path}: tokenizer {manifest['tokenizer']!r} without a 'tokenizer_file' (only gpt2 is built in)")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise GPTForgeError(f"{path}: field 'dtype' is {manifest['dtype']!r}, expected uint16 or uint32")
    if np.iinfo(manifest["dtype"]).max < manifest["vocab_size"] - 1:
        raise GPTForgeError(f"{path}: dtype {manifest['dtype']} cannot hold ids of a {manifest['vocab_size']}-token vocabulary")
    for split, body in manifest["splits"].items():
        shards = body.get("shards") if isinstance(body, dict) else None
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_tokens"), int)
            and isinstance(s.get("sha256"), str) for s in shards
        ):
            raise GPTForgeError(f"{path}: splits.{split}.shards must list {{file, num_tokens, sha256}} entries")
        for s in shards:
            if not SHARD_RE.match(s["file"]):
                raise GPTForgeError(f"{path}: splits.{split}: bad shard file name {s['file']!r}")
    return manifest


def data_tokenizer(data_dir: str | os.PathLike, manifest: dict | None = None) -> tk.Tokenizer:
    """The tokenizer a prepared directory was made with: GPT-2's, or the trained one stored in it
    (checked against the manifest's sha256, name and vocabulary size; tokenizer.of_data)."""
    return tk.of_data(data_dir, manifest if manifest is not None else read_manifest(data_dir))


@dataclass(frozen=True)
class ShardInfo:
    """Where a shard's tokens are: enough to (re)map it without parsing the header again."""

    path: Path
    num_tokens: int
    dtype: np.dtype
    offset: int  # bytes of the .npy header

    def memmap(self) -> np.ndarray:
        """A plain ndarray view of the read-only mapping (fast slicing, no np.memmap overhead)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.num_tokens,)).view(np.ndarray)


def _read_npy_header(path: Path) -> tuple[np.dtype, tuple, bool, int]:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            return dtype, shape, fortran, f.tell()
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: shard listed in {MANIFEST} is missing") from e
    except OSError as e:
        raise GPTForgeError(f"{path}: cannot read shard ({e.strerror})") from e
    except (ValueError, EOFError) as e:
        raise GPTForgeError(f"{path}: not a valid .npy shard (bad header: {e})") from e


def check_shard(data_dir: Path, entry: dict, dtype: np.dtype) -> ShardInfo:
    """Cheap checks of one shard against its manifest entry: header, dtype, shape, file size."""
    path = Path(data_dir) / entry["file"]
    got_dtype, shape, fortran, offset = _read_npy_header(path)
    n = entry["num_tokens"]
    if got_dtype != dtype:
        raise GPTForgeError(f"{path}: dtype {got_dtype}, but {MANIFEST} says {dtype}")
    if len(shape) != 1 or fortran:
        raise GPTForgeError(f"{path}: shape {shape}, expected a 1-D array of {n} tokens")
    if shape[0] != n:
        raise GPTForgeError(f"{path}: holds {shape[0]} tokens, but {MANIFEST} says {n}")
    want, size = offset + n * dtype.itemsize, path.stat().st_size
    if size < want:
        raise GPTForgeError(f"{path}: truncated: {size} bytes, expected {want} ({n} tokens of {dtype})")
    if size > want:
        raise GPTForgeError(f"{path}: {size} bytes, expected {want} ({n} tokens of {dtype}): trailing data")
    return ShardInfo(path, n, dtype, offset)


def open_split(data_dir: str | os.PathLike, split: str, manifest: dict | None = None) -> list[ShardInfo]:
    """Check every shard of a split cheaply and open it once with np.load(mmap_mode='r')."""
    data_dir = Path(data_dir)
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise GPTForgeError(f"{data_dir}: no split {split!r} in {MANIFEST} (splits: {', '.join(manifest['splits'])})")
    dtype = np.dtype(manifest["dtype"])
    infos = []
    for entry in manifest["splits"][split]["shards"]:
        info = check_shard(data_dir, entry, dtype)
        try:
            arr = np.load(info.path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise GPTForgeError(f"{info.path}: cannot open as a memory-mapped .npy ({e})") from e
        if arr.dtype != dtype or arr.shape != (info.num_tokens,) or arr.offset != info.offset:
            raise GPTForgeError(f"{info.path}: header disagrees with {MANIFEST}")
        del arr
        infos.append(info)
    return infos


def verify(data_dir: str | os.PathLike) -> dict:
    """Full check: every shard's cheap checks, sha256, document count and token ids < vocab size.

    Returns {"shards", "tokens"} when everything agrees, else raises one GPTForgeError listing
    every problem found.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    dtype, vocab, eot = np.dtype(manifest["dtype"]), manifest["vocab_size"], manifest["eot_id"]
    problems: list[str] = []
    n_shards = n_tokens = 0
    for split, body in manifest["splits"].items():
        for entry in body["shards"]:
            try:
                info = check_shard(data_dir, entry, dtype)
            except GPTForgeError as e:
                problems.append(str(e))
                continue
            arr, docs, top = info.memmap(), 0, -1
            for i in range(0, info.num_tokens, _BLOCK):
                block = arr[i : i + _BLOCK]
                top = max(top, int(block.max()))
                docs += int(np.count_nonzero(block == eot))
                if top >= vocab:
                    pos = i + int(np.argmax(block >= vocab))
                    problems.append(f"{info.path}: token id {int(arr[pos])} at position {pos} is >= the vocabulary size {vocab}")
                    break
            del arr
            digest = file_sha256(info.path)
            if digest != entry["sha256"]:
                problems.append(f"{info.path}: sha256 {digest} disagrees with {MANIFEST} ({entry['sha256']})")
            if "num_documents" in entry and docs != entry["num_documents"] and top < vocab:
                problems.append(f"{info.path}: {docs} documents (EOT tokens), {MANIFEST} says {entry['num_documents']}")
            n_shards += 1
            n_tokens += info.num_tokens
        for key in ("num_tokens", "num_documents"):  # the split's totals must add up too
            listed = [e.get(key) for e in body["shards"]]
            if key in body and all(isinstance(v, int) for v in listed) and body[key] != sum(listed):
                problems.append(f"{data_dir / MANIFEST}: splits.{split}.{key} is {body[key]!r}, its shards add up to {sum(listed)}")
    if "tokenizer_file" in manifest:  # the tokenizer stored with the data: its sha256, name and size
        try:
            data_tokenizer(data_dir, manifest)
        except GPTForgeError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise GPTForgeError(f"{data_dir}: verification failed: " + "; ".join(problems[:5]) + more)
    return {"shards": n_shards, "tokens": n_tokens}


def write_dataset(
    data_dir: str | os.PathLike,
    splits: dict[str, Iterable[np.ndarray]],
    *,
    vocab_size: int,
    eot_id: int,
    tokenizer: str,
    extra: dict | None = None,
) -> dict:
    """Write token arrays as a prepared directory: each array of splits[name] becomes one shard.

    For tokens made elsewhere (tests, benchmarks, another tokenizer); `gptforge prepare` is the
    usual way. Returns the manifest.
    """
    data_dir = Path(data_dir)
    dtype = token_dtype(vocab_size)
    body = {}
    for split, arrays in splits.items():
        if split not in SPLITS:
            raise GPTForgeError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        entries = []
        for i, arr in enumerate(arrays):
            arr = np.asarray(arr)
            if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() >= vocab_size)):
                raise GPTForgeError(f"{split} shard {i}: expected a 1-D array of ids in [0, {vocab_size})")
            entries.append(write_shard(data_dir / shard_name(split, i), [arr], arr.size, dtype, eot_id))
        body[split] = {
            "num_tokens": sum(e["num_tokens"] for e in entries),
            "num_documents": sum(e["num_documents"] for e in entries),
            "shards": entries,
        }
    manifest = {
        "format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "vocab_size": vocab_size,
        "eot_id": eot_id, "dtype": dtype.name, "splits": body, **(extra or {}),
    }
    write_manifest(data_dir, manifest)
    return manifest


def listed_files(data_dir: str | os.PathLike) -> list[Path]:
    """Shard-named files present in a directory (ours or leftovers)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if SHARD_RE.match(p.name))
