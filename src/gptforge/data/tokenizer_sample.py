"""Train a tokenizer on the sources `prepare` reads: a sample of at most `max_chars` characters,
spread over the whole corpus.

The sources are read exactly as `prepare` reads them (sources.py: the same files, order, text
field, split, and the same policy for files that are unreadable or not UTF-8: skipped with a
warning, or fatal with `strict`). How much text the corpus holds is estimated before reading from
what costs nothing: the sizes of plain files, the length a gzip file records in its trailer, the
uncompressed size a parquet file's metadata gives. With that estimate E and f = max_chars / E,
a document is taken when the characters taken, with half of it, stay within f times the
characters read, it included (every document when the corpus is smaller than max_chars), and
the first document always: the sample is spread evenly over the corpus. Reading stops once max_chars are taken; a document
that would pass max_chars is cut there. `hf:` sources have no such estimate: their first max_chars characters are taken.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from gptforge import tokenizer as tk
from gptforge.data import sources as _src
from gptforge.errors import GPTForgeError

DEFAULT_MAX_CHARS = 2_000_000_000  # nanochat trains its tokenizer on 2B characters


def estimate_chars(srcs: list[_src.Source]) -> int | None:
    """Characters the sources hold, roughly (bytes for plain text); None when unknown (hf:)."""
    total = 0
    for src in srcs:
        if src.is_hf:
            return None
        for p in src.files:
            try:
                name = p.name.lower()
                if name.endswith(".gz"):
                    with open(p, "rb") as f:  # ISIZE: the uncompressed length mod 2^32
                        f.seek(-4, os.SEEK_END)
                        total += max(struct.unpack("<I", f.read(4))[0], p.stat().st_size)
                elif name.endswith(".parquet"):
                    import pyarrow.parquet as pq

                    md = pq.ParquetFile(p).metadata
                    total += sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
                else:
                    total += p.stat().st_size
            except Exception:  # unreadable files are reported (and skipped) when they are read
                continue
    return total


def _warn_above_bars(msg: str) -> None:
    tqdm.write(f"gptforge: warning: {msg}", file=sys.stderr)  # not through the bar


def sample_documents(srcs: list[_src.Source], max_chars: int, *, text_field: str = "text", split: str = "train",
                     strict: bool = False, stats: _src.SourceStats | None = None, progress: bool = True,
                     info: dict | None = None, warn: Callable[[str], None] = _warn_above_bars) -> Iterator[str]:
    """The documents (or their beginnings) of the sample described in the module doc; `info` gets
    the counts (documents and characters read and taken) when the iterator is exhausted."""
    estimate = estimate_chars(srcs)
    fraction = 1.0 if not estimate else min(1.0, max_chars / estimate)
    stats = stats if stats is not None else _src.SourceStats()
    docs = _src.iter_documents(srcs, text_field=text_field, split=split, strict=strict, stats=stats, warn=warn)
    total = max_chars if estimate is None else min(max_chars, int(estimate * fraction))
    bar = tqdm(total=total, desc="reading text", unit=" chars", unit_scale=True, disable=not progress,
               mininterval=0.2 if sys.stderr.isatty() else 30.0)
    seen = taken = n_taken = 0
    with bar:
        for doc in docs:
            seen += len(doc)
            if taken + len(doc) / 2 <= fraction * seen or not taken:
                doc = doc[: max_chars - taken]
                taken += len(doc)
                n_taken += 1
                bar.update(len(doc))
                yield doc
                if taken >= max_chars:
                    break
    if info is not None:
        info.update(documents_read=stats.documents, chars_read=seen, documents=n_taken, chars=taken,
                    estimated_chars=estimate, files_skipped=len(stats.skipped))


def train_tokenizer(
    sources: "list[str] | list[_src.Source]",
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    pattern: str = tk.DEFAULT_PATTERN,
    text_field: str = "text",
    split: str = "train",
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] = _warn_above_bars,
) -> tk.Tokenizer:
    """Train a byte-level BPE on a sample of `sources` (names, or resolved Sources) and write its
    directory to `out_dir` (atomically: complete or not at all). Returns the tokenizer."""
    tk.check_vocab_size(vocab_size)
    if not isinstance(max_chars, int) or max_chars < 1:
        raise GPTForgeError(f"--max-chars must be a positive integer, got {max_chars!r}")
    if pattern not in tk.PATTERNS:
        raise GPTForgeError(f"--pattern {pattern!r}: expected one of {', '.join(tk.PATTERNS)}")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise GPTForgeError(f"{out} already exists (pass --overwrite to replace it)")
    srcs = sources if sources and all(isinstance(s, _src.Source) for s in sources) else _src.resolve_all(sources)
    stats = _src.SourceStats()
    info: dict = {}
    t0 = time.perf_counter()
    docs = sample_documents(srcs, max_chars, text_field=text_field, split=split, strict=strict, stats=stats,
                            progress=progress, info=info, warn=warn)
    texts = _nonempty_or_error(docs, [s.spec for s in srcs], stats)
    trained = {
        "sources": [s.spec if s.is_hf or s.spec == _src.STDLIB else _src.portable_path(s.spec, out) for s in srcs],
        "max_chars": max_chars, "text_field": text_field, "split": split,
    }
    tok = tk.train_bpe(texts, vocab_size, pattern, trained)
    tok.meta["trained"].update(info, seconds=round(time.perf_counter() - t0, 2))
    tok.save(out, overwrite=overwrite)
    return tok


def _nonempty_or_error(docs: Iterator[str], sources: list[str], stats: _src.SourceStats) -> Iterator[str]:
    """The documents; an empty corpus is one line (raised through the trainer's iteration)."""
    any_doc = False
    for doc in docs:
        any_doc = True
        yield doc
    if not any_doc:
        skipped = f", {len(stats.skipped)} files skipped" if stats.skipped else ""
        raise GPTForgeError(
            f"no documents found in {', '.join(sources)} ({stats.files_read} files read{skipped}, "
            f"{stats.empty} empty documents): nothing to train a tokenizer on"
        )
