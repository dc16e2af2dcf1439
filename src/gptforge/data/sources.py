"""Where documents come from: local files and directories, Hugging Face datasets, the Python stdlib.

A source is one command-line word:
  * a file: `.txt` / `.md` (one document per file), `.jsonl` (one document per line, the string
    field `text_field`), `.parquet` (the string column `text_field`, read one row group at a time),
    and the gzip-compressed `.txt.gz` / `.md.gz` / `.jsonl.gz`;
  * a directory: every such file below it, recursively, in sorted path order (hidden files and
    directories are skipped, files of other types ignored);
  * `hf:NAME[:CONFIG]`: a Hugging Face dataset read with `datasets.load_dataset(..., streaming=True)`;
  * `python-stdlib`: the `.py` files of the running Python's standard library (not site-packages),
    one document per file: a corpus present on every machine.

Documents come out in a deterministic order. Empty documents are dropped. A file that cannot be
read or is not UTF-8 is skipped whole, counted and warned about, or is fatal with `strict`; every
other bad input (a missing text field, invalid JSON, ...) is a GPTForgeError naming the file.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import itertools
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from gptforge.errors import GPTForgeError

STDLIB = "python-stdlib"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".md", ".txt.gz", ".md.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
SUPPORTED_TEXT = ", ".join(SUPPORTED)
PARQUET_BATCH_ROWS = 1024
MAX_WARNINGS = 10  # per-file warnings printed; the rest are only counted


@dataclass(frozen=True)
class Source:
    """A resolved source: `spec` is canonical (absolute path, hf:NAME[:CONFIG] or python-stdlib)."""

    spec: str
    files: tuple[Path, ...] = ()  # local sources: every file, in reading order
    hf_name: str = ""
    hf_config: str | None = None

    @property
    def is_hf(self) -> bool:
        return bool(self.hf_name)


@dataclass
class SourceStats:
    """What reading the sources found; filled in while documents are consumed."""

    files_read: int = 0
    documents: int = 0
    empty: int = 0  # empty (or null) documents dropped
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): unreadable / not UTF-8

    def to_dict(self, max_listed: int = 20) -> dict:
        return {
            "files_read": self.files_read,
            "documents": self.documents,
            "empty_dropped": self.empty,
            "files_skipped": len(self.skipped),
            "skipped_files": [f"{p}: {why}" for p, why in self.skipped[:max_listed]],
        }


class _Skip(Exception):
    """A file that is unreadable or not UTF-8: skipped (counted, warned) unless strict."""


def _stderr_warn(msg: str) -> None:
    print(f"gptforge: warning: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# resolving command-line words into sources


def _kind(name: str) -> str | None:
    low = name.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if low.endswith(suffixes):
            return kind
    return None


def _walk(root: Path, keep: Callable[[str], bool], skip_dirs: tuple[str, ...] = ()) -> list[Path]:
    """Files below `root` whose name passes `keep`, sorted by their path parts (deterministic)."""
    found: list[tuple[tuple[str, ...], Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        rel = Path(dirpath).relative_to(root).parts
        for name in filenames:
            if not name.startswith(".") and keep(name):
                found.append((rel + (name,), Path(dirpath) / name))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The .py files of the running Python's standard library, without site-/dist-packages."""
    return _walk(stdlib_root(), lambda n: n.endswith(".py"), ("site-packages", "dist-packages", "__pycache__"))


def parse_hf(spec: str) -> tuple[str, str | None]:
    """'hf:NAME[:CONFIG]' -> (NAME, CONFIG or None)."""
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    if not name:
        raise GPTForgeError(f"source {spec!r}: expected hf:NAME or hf:NAME:CONFIG (e.g. hf:roneneldan/TinyStories)")
    return name, (config or None)


def resolve(spec: str) -> Source:
    """One command-line word -> a Source with its file list; a missing or unsupported path is an error."""
    if spec == STDLIB:
        files = stdlib_files()
        if not files:
            raise GPTForgeError(f"source {STDLIB}: no .py files found under {stdlib_root()}")
        return Source(STDLIB, tuple(files))
    if spec.startswith(HF_PREFIX):
        name, config = parse_hf(spec)
        return Source(spec, hf_name=name, hf_config=config)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _walk(path, lambda n: _kind(n) is not None)
        if not files:
            raise GPTForgeError(f"source {spec}: directory holds no {SUPPORTED_TEXT} files")
        return Source(str(path.resolve()), tuple(files))
    if not path.exists():
        raise GPTForgeError(f"source {spec}: no such file or directory (expected a file, a directory, hf:NAME or {STDLIB})")
    if _kind(path.name) is None:
        raise GPTForgeError(f"source {spec}: unsupported file type; expected {SUPPORTED_TEXT}")
    return Source(str(path.resolve()), (path,))


def resolve_all(specs: Iterable[str]) -> list[Source]:
    specs = list(specs)
    if not specs:
        raise GPTForgeError(f"no sources given: name files, directories, hf:NAME or {STDLIB}")
    return [resolve(s) for s in specs]


def fingerprint(sources: list[Source]) -> str:
    """sha256 over every source's spec and its files' (path, size, mtime): 'the same inputs'."""
    h = hashlib.sha256()
    for src in sources:
        h.update(json.dumps(["source", src.spec, src.hf_name, src.hf_config]).encode())
        for p in src.files:
            try:
                st = p.stat()
                h.update(json.dumps([str(p), st.st_size, st.st_mtime_ns]).encode())
            except OSError:
                h.update(json.dumps([str(p), -1, -1]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# reading documents


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_errors():
    return (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def _utf8_error(e: UnicodeDecodeError, offset: int) -> str:
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {offset + e.start})"


def _read_text(path: Path) -> str:
    try:
        with _open_binary(path) as f:
            data = f.read()
    except _read_errors() as e:
        raise _Skip(f"unreadable ({getattr(e, 'strerror', None) or e})") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Skip(_utf8_error(e, 0)) from e


def _check_utf8(path: Path, block: int = 1 << 20) -> None:
    """Read the whole file once: a file is either used whole or skipped whole."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with _open_binary(path) as f:
            while chunk := f.read(block):
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as e:
                    raise _Skip(_utf8_error(e, offset)) from e
                offset += len(chunk)
        dec.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise _Skip(_utf8_error(e, offset)) from e
    except _read_errors() as e:
        raise _Skip(f"unreadable ({getattr(e, 'strerror', None) or e})") from e


def _field_value(value, where: str, text_field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise GPTForgeError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")


def _read_jsonl(path: Path, text_field: str) -> Iterator[str | None]:
    _check_utf8(path)
    try:
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GPTForgeError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(record, dict):
                    raise GPTForgeError(f"{where}: expected a JSON object, got {type(record).__name__}")
                if text_field not in record:
                    keys = ", ".join(map(str, list(record)[:10])) or "none"
                    raise GPTForgeError(f"{where}: no field {text_field!r} (fields: {keys}); choose one with --text-field")
                yield _field_value(record[text_field], where, text_field)
    except _read_errors() as e:  # the file changed or vanished after the check
        raise GPTForgeError(f"{path}: read failed: {getattr(e, 'strerror', None) or e}") from e


def _read_parquet(path: Path, text_field: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _Skip(f"unreadable as parquet ({e})") from e
    schema = pf.schema_arrow
    if text_field not in schema.names:
        cols = ", ".join(schema.names[:10]) or "none"
        raise GPTForgeError(f"{path}: no column {text_field!r} (columns: {cols}); choose one with --text-field")
    tp = schema.field(text_field).type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or getattr(pa.types, "is_string_view", lambda t: False)(tp)):
        raise GPTForgeError(f"{path}: column {text_field!r} has type {tp}, expected a string column")
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise GPTForgeError(f"{path}: cannot read column {text_field!r}: {e}") from e


def _read_file(path: Path, kind: str, text_field: str) -> Iterator[str | None]:
    if kind == "jsonl":
        return _read_jsonl(path, text_field)
    if kind == "parquet":
        return _read_parquet(path, text_field)
    return iter((_read_text(path),))


def load_hf_streaming(name: str, config: str | None, split: str, **kwargs):
    """`datasets.load_dataset(name, config, split=split, streaming=True)`: nothing downloaded whole."""
    try:
        import datasets
    except ImportError as e:
        raise GPTForgeError(f"hf:{name}: reading Hugging Face datasets needs the 'datasets' package (pip install 'gptforge[hf]')") from e
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True, **kwargs)
    except Exception as e:  # datasets raises many types; the user needs the message
        msg = " ".join(str(e).split())
        raise GPTForgeError(f"hf:{name}{':' + config if config else ''}: cannot open split {split!r}: {msg}") from e


def dataset_documents(ds, text_field: str, where: str) -> Iterator[str | None]:
    """Texts of a (streaming) `datasets` dataset, one per record, in the dataset's order."""
    records = iter(ds)
    for i in itertools.count():
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as e:  # a stream cut off, a malformed remote file: one line naming the place
            msg = " ".join(str(e).split())
            raise GPTForgeError(f"{where}: reading record {i} failed: {type(e).__name__}: {msg}") from e
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(map(str, list(record)[:10])) if isinstance(record, dict) else ""
            raise GPTForgeError(f"{where}: record {i} has no field {text_field!r} (fields: {keys or 'none'}); choose one with --text-field")
        yield _field_value(record[text_field], f"{where} record {i}", text_field)


def hf_documents(name: str, config: str | None, split: str, text_field: str, **load_kwargs) -> Iterator[str | None]:
    """The documents of hf:NAME[:CONFIG]; load_kwargs (e.g. data_files) go to load_dataset."""
    ds = load_hf_streaming(name, config, split, **load_kwargs)
    spec = f"hf:{name}{':' + config if config else ''}"
    return dataset_documents(ds, text_field, f"{spec} split {split}")


def iter_documents(
    sources: list[Source],
    *,
    text_field: str = "text",
    split: str = "train",
    strict: bool = False,
    stats: SourceStats | None = None,
    warn: Callable[[str], None] = _stderr_warn,
) -> Iterator[str]:
    """Every non-empty document of every source, in order. Fills `stats` as it goes."""
    stats = stats if stats is not None else SourceStats()
    warned = 0

    def texts() -> Iterator[str | None]:
        nonlocal warned
        for src in sources:
            if src.is_hf:
                yield from hf_documents(src.hf_name, src.hf_config, split, text_field)
                continue
            for path in src.files:
                kind = "text" if src.spec == STDLIB else _kind(path.name)
                try:
                    yield from _read_file(path, kind, text_field)
                except _Skip as e:
                    if strict:
                        raise GPTForgeError(f"{path}: {e} (without --strict such files are skipped)") from e
                    stats.skipped.append((str(path), str(e)))
                    warned += 1
                    if warned <= MAX_WARNINGS:
                        warn(f"skipping {path}: {e}")
                    elif warned == MAX_WARNINGS + 1:
                        warn("more files skipped; the count is in the summary and manifest.json")
                    continue
                stats.files_read += 1

    for text in texts():
        if not text:
            stats.empty += 1
            continue
        stats.documents += 1
        yield text
