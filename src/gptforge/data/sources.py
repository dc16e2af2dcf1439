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

Only regular files are read: a FIFO, device or socket (or a symlink to one, such as /dev/zero), a
dangling symlink or a symlink loop found in a directory is skipped the same way, with a warning
naming it; named directly as a source, it is an error.

`iter_pieces` hands a document on in pieces of about PIECE_CHARS characters, so memory stays flat
for any document length: a text file is read and decoded in blocks (after one pass that checks it
is UTF-8 throughout). A document is cut only where a space follows a non-space character: no
pre-tokenizer regex of gptforge's (GPT-2's, GPT-4's, nanochat's) matches across that point, so the
tokens of the pieces are those of the whole document. A document with no such point in
MAX_PIECE_CHARS characters is cut there (its tokens may then differ at the cut).
"""

from __future__ import annotations

import codecs
import errno
import gzip
import hashlib
import itertools
import json
import os
import stat
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from gptforge.errors import GPTForgeError
from gptforge.fsutil import loads_object

STDLIB = "python-stdlib"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".md", ".txt.gz", ".md.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
SUPPORTED_TEXT = ", ".join(SUPPORTED)
PARQUET_BATCH_ROWS = 1024
MAX_WARNINGS = 10  # per-file warnings printed; the rest are only counted
READ_BLOCK = 1 << 20  # bytes read at a time from a text file
PIECE_CHARS = 1 << 20  # a document longer than this is handed on in pieces (see the module doc)
MAX_PIECE_CHARS = 1 << 22  # ... cut here when no safe point comes sooner

Piece = tuple[str, bool]  # (text, whether it is the first piece of a document)


@dataclass(frozen=True)
class Source:
    """A resolved source: `spec` is canonical (absolute path, hf:NAME[:CONFIG] or python-stdlib)."""

    spec: str
    files: tuple[Path, ...] = ()  # local sources: every regular file, in reading order
    hf_name: str = ""
    hf_config: str | None = None
    # what a directory holds that is not a regular file: (index in `files` it comes before, path, why)
    rejected: tuple[tuple[int, Path, str], ...] = ()

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


def not_regular(path: Path) -> str | None:
    """Why `path` is not a regular file to read (following symlinks), or None when it is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        dangling = ": a dangling symlink" if os.path.islink(path) else ""
        return f"unreadable ({e.strerror}{dangling})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "not a regular file")
    return f"{kind}{' (by a symlink)' if os.path.islink(path) else ''}, not a regular file"


def _walk_all(root: Path, keep: Callable[[str], bool], skip_dirs: tuple[str, ...] = ()
              ) -> tuple[list[Path], list[tuple[int, Path, str]]]:
    """(regular files, other entries as (index in the files they come before, path, reason)) below
    `root` whose name passes `keep`, sorted by their path parts (deterministic)."""
    found: list[tuple[tuple[str, ...], Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        rel = Path(dirpath).relative_to(root).parts
        for name in filenames:
            if not name.startswith(".") and keep(name):
                found.append((rel + (name,), Path(dirpath) / name))
    found.sort(key=lambda t: t[0])
    files, rejected = [], []
    for _, p in found:
        why = not_regular(p)
        if why is None:
            files.append(p)
        else:
            rejected.append((len(files), p, why))
    return files, rejected


def _walk(root: Path, keep: Callable[[str], bool], skip_dirs: tuple[str, ...] = ()) -> list[Path]:
    """The regular files below `root` whose name passes `keep` (see _walk_all)."""
    return _walk_all(root, keep, skip_dirs)[0]


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
        files, rejected = _walk_all(path, lambda n: _kind(n) is not None)
        if not files and not rejected:
            raise GPTForgeError(f"source {spec}: directory holds no {SUPPORTED_TEXT} files")
        return Source(str(path.resolve()), tuple(files), rejected=tuple(rejected))
    if not os.path.lexists(path):
        raise GPTForgeError(f"source {spec}: no such file or directory (expected a file, a directory, hf:NAME or {STDLIB})")
    why = not_regular(path)
    if why is not None:
        raise GPTForgeError(f"source {spec}: {why}; expected a file, a directory, hf:NAME or {STDLIB}")
    if _kind(path.name) is None:
        raise GPTForgeError(f"source {spec}: unsupported file type; expected {SUPPORTED_TEXT}")
    return Source(str(path.resolve()), (path,))


def resolve_all(specs: Iterable[str]) -> list[Source]:
    specs = list(specs)
    if not specs:
        raise GPTForgeError(f"no sources given: name files, directories, hf:NAME or {STDLIB}")
    return [resolve(s) for s in specs]


def portable_path(path: str | os.PathLike, out: Path) -> str:
    """A local path as a shareable dataset records it (see data/prepare.py's module doc)."""
    p, d = _resolved(Path(path).expanduser()), _resolved(Path(out).expanduser())
    home = Path.home().resolve()
    if p.is_relative_to(home) and not d.is_relative_to(home):
        return str(Path("~") / p.relative_to(home))
    try:
        common = Path(os.path.commonpath([p, d]))
    except ValueError:  # different drives
        return str(p)
    if common.parent != common:  # they share a directory below the root
        return os.path.relpath(p, d)
    return str(p)


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: its own absolute path names it well enough
        return Path(os.path.abspath(path))


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
    """The file for reading, refused unless it is a regular file when opened (not only when the
    directory was listed): opening never blocks on a FIFO, and a device is never read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        why = not_regular(path)
        raise _Skip(why or f"unreadable ({e.strerror})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Skip(not_regular(path) or "not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return gzip.GzipFile(fileobj=f, mode="rb") if path.name.lower().endswith(".gz") else f


def _read_errors():
    return (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def _utf8_error(e: UnicodeDecodeError, offset: int) -> str:
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {offset + e.start})"


def _text_pieces(path: Path) -> Iterator[str]:
    """The text of a file in pieces (see the module doc); a small file is read in one pass, a
    larger one checked for UTF-8 first (a file is used whole or skipped whole), then read in blocks."""
    try:
        small = not path.name.lower().endswith(".gz") and os.stat(path).st_size <= READ_BLOCK
    except OSError:
        small = True  # reported by the read below
    if small:
        try:
            with _open_binary(path) as f:
                data = f.read()
        except _read_errors() as e:
            raise _Skip(f"unreadable ({getattr(e, 'strerror', None) or e})") from e
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Skip(_utf8_error(e, 0)) from e
        yield from split_pieces((text,))
        return
    _check_utf8(path)
    yield from split_pieces(_decoded_blocks(path))


def _decoded_blocks(path: Path) -> Iterator[str]:
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        with _open_binary(path) as f:
            while block := f.read(READ_BLOCK):
                yield dec.decode(block)
        yield dec.decode(b"", final=True)
    except (UnicodeDecodeError, _Skip, *_read_errors()) as e:  # it was checked: it changed since
        raise GPTForgeError(f"{path}: read failed, the file changed while it was read ({e})") from e


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The last i in (lo, hi] where a space follows a non-space character (text[i] == " " and
    text[i-1] is no whitespace), or 0 when there is none."""
    i = text.rfind(" ", lo + 1, hi + 1)
    while i > lo:
        if not text[i - 1].isspace():
            return i
        i = text.rfind(" ", lo + 1, i)
    return 0


def split_pieces(blocks: Iterable[str], size: int | None = None, max_size: int | None = None) -> Iterator[str]:
    """Text arriving in `blocks`, handed on in pieces of about `size` (PIECE_CHARS) characters cut at
    safe points (see the module doc); at most `max_size` (MAX_PIECE_CHARS) characters each. Never
    an empty piece but for empty text."""
    size, max_size = size or PIECE_CHARS, max_size or MAX_PIECE_CHARS
    carry, any_out = "", False
    for block in blocks:
        if not block:
            continue
        carry += block
        while len(carry) >= size:
            cut = _safe_cut(carry, 0, size) or _safe_cut(carry, size, min(len(carry), max_size) - 1)
            if not cut:
                if len(carry) < max_size:
                    break  # wait for more text: a safe point may come
                cut = max_size
            any_out = True
            yield carry[:cut]
            carry = carry[cut:]
    if carry or not any_out:
        yield carry


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
                record = loads_object(line, where)
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


def _file_pieces(path: Path, kind: str, text_field: str) -> Iterator[tuple[str | None, bool]]:
    """(piece, first piece of a document) of one file."""
    if kind == "text":
        for i, piece in enumerate(_text_pieces(path)):
            yield piece, i == 0
        return
    for doc in (_read_jsonl if kind == "jsonl" else _read_parquet)(path, text_field):
        yield from _doc_pieces(doc)


def _doc_pieces(doc: str | None) -> Iterator[tuple[str | None, bool]]:
    if not doc or len(doc) <= PIECE_CHARS:
        yield doc, True
        return
    for i, piece in enumerate(split_pieces((doc,))):
        yield piece, i == 0


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


def iter_pieces(
    sources: list[Source],
    *,
    text_field: str = "text",
    split: str = "train",
    strict: bool = False,
    stats: SourceStats | None = None,
    warn: Callable[[str], None] = _stderr_warn,
) -> Iterator[tuple[str, bool]]:
    """Every non-empty document of every source, in order, as (piece, first piece of a document)
    (see the module doc). Fills `stats` as it goes; each skipped file is warned about once."""
    stats = stats if stats is not None else SourceStats()
    warned = 0

    def skip(path: Path, why: str) -> None:
        nonlocal warned
        if strict:
            raise GPTForgeError(f"{path}: {why} (without --strict such files are skipped)")
        stats.skipped.append((str(path), why))
        warned += 1
        if warned <= MAX_WARNINGS:
            warn(f"skipping {path}: {why}")
        elif warned == MAX_WARNINGS + 1:
            warn("more files skipped; the count is in the summary and manifest.json")

    def pieces() -> Iterator[tuple[str | None, bool]]:
        for src in sources:
            if src.is_hf:
                for doc in hf_documents(src.hf_name, src.hf_config, split, text_field):
                    yield from _doc_pieces(doc)
                continue
            rejected = list(src.rejected)
            for i, path in enumerate(src.files):
                while rejected and rejected[0][0] <= i:
                    skip(*rejected.pop(0)[1:])
                kind = "text" if src.spec == STDLIB else _kind(path.name)
                try:
                    yield from _file_pieces(path, kind, text_field)
                except _Skip as e:  # raised before the file's first piece: skipped whole
                    skip(path, str(e))
                    continue
                stats.files_read += 1
            for _, path, why in rejected:
                skip(path, why)

    for text, first in pieces():
        if first:
            if not text:
                stats.empty += 1
                continue
            stats.documents += 1
        yield text, first


def iter_documents(
    sources: list[Source],
    *,
    text_field: str = "text",
    split: str = "train",
    strict: bool = False,
    stats: SourceStats | None = None,
    warn: Callable[[str], None] = _stderr_warn,
) -> Iterator[str]:
    """Every non-empty document of every source, in order, whole. Fills `stats` as it goes."""
    doc: list[str] = []
    for piece, first in iter_pieces(sources, text_field=text_field, split=split, strict=strict, stats=stats, warn=warn):
        if first and doc:
            yield "".join(doc)
            doc = []
        doc.append(piece)
    if doc:
        yield "".join(doc)
