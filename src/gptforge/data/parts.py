"""Stage 1 of `prepare`: documents -> token parts `.parts/part_{i:06d}.npy`, then where val ends.

The token stream (each document as [EOT] + its tokens; data/encode.py) is cut into parts of about
`part_tokens` tokens, at the first document start at or after that size where there is one in
what is buffered, else at the end of the buffer (inside a long document). Each part is written
atomically, in order. A re-run keeps the finished parts up to the last one that ends at a document
boundary (the part after it begins with EOT), reads again but does not tokenize the documents they
hold (counted by their EOT tokens), and tokenizes from the next document on: the token stream, and
so every shard cut from it, is the same as an uninterrupted run's. When all parts exist,
`.parts/layout.json` records their sizes, the validation boundary and the source statistics.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from gptforge.data import shards
from gptforge.data import sources as _src
from gptforge.data.encode import Codec, chunks, encode_stream, worker_pool
from gptforge.errors import GPTForgeError

PARTS = ".parts"
LAYOUT = "layout.json"
MAX_PART_TOKENS = 1 << 24
VAL_FRACTION = 0.005  # default validation split: 0.5% of all tokens ...
VAL_CAP = 10_000_000  # ... but at most 10M tokens
VAL_MIN = 32_769  # ... and at least this (run.eval_tokens 32,768 targets: 8 batches of the default 16 x 256) ...
VAL_SMALL_FRACTION = 0.10  # ... or this fraction of a small corpus, whichever is less
VAL_CUT_MIN = 1_024  # default targets from this size on may cut inside a document (see val_boundary)


def default_val_tokens(total_tokens: int) -> int:
    """0.5% of a large corpus (at most 10M tokens); enough for the default evaluation, but at most
    10%, of a small one (so that a tinyshakespeare-sized corpus trains and evaluates with the defaults)."""
    small = min(VAL_MIN, math.ceil(total_tokens * VAL_SMALL_FRACTION))
    return min(VAL_CAP, max(math.ceil(total_tokens * VAL_FRACTION), small))


def bar_interval() -> float:
    return 0.2 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not 5 a second


def eot_of(options: dict) -> int:
    return options["vocab_size"] - 1  # GPT-2's <|endoftext|> and a trained tokenizer's are the last id


def part_path(parts: Path, i: int) -> Path:
    return parts / f"part_{i:06d}.npy"


def load_part(parts: Path, i: int) -> np.ndarray:
    path = part_path(parts, i)
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise GPTForgeError(f"{path}: unfinished preparation is damaged ({e}); pass --overwrite to start again") from e


def _count_eot(arr: np.ndarray, eot: int, block: int = 1 << 24) -> int:
    return sum(int(np.count_nonzero(arr[i : i + block] == eot)) for i in range(0, arr.shape[0], block))


def _finished_parts(parts: Path, eot: int) -> tuple[list[int], int]:
    """(sizes, documents) of the finished parts a re-run keeps (see the module doc); the others are removed."""
    sizes, eots, starts_doc = [], [], []
    while part_path(parts, len(sizes)).exists():  # parts are written in order, each atomically
        arr = load_part(parts, len(sizes))
        sizes.append(int(arr.shape[0]))
        eots.append(_count_eot(arr, eot))
        starts_doc.append(bool(arr.shape[0]) and int(arr[0]) == eot)
        del arr
    keep = max((i for i in range(len(sizes)) if starts_doc[i]), default=0)  # whether the last part ends a document is unknown
    for i in range(keep, len(sizes)):
        with contextlib.suppress(FileNotFoundError):
            part_path(parts, i).unlink()
    return sizes[:keep], sum(eots[:keep])


def _skip_documents(pieces: Iterator[_src.Piece], n: int, where: Path) -> Iterator[_src.Piece]:
    """`pieces` from the start of document n + 1 on (the first n documents read, not kept)."""
    seen = 0
    for text, first in pieces:
        if first:
            if seen == n:
                return itertools.chain([(text, first)], pieces)
            seen += 1
    if seen < n:
        raise GPTForgeError(
            f"the sources now hold fewer documents than the unfinished preparation in {where} "
            "already tokenized; pass --overwrite to start again"
        )
    return iter(())


def tokenize(srcs: list[_src.Source], parts: Path, options: dict, codec: Codec, workers: int, progress: bool,
             warn: Callable[[str], None], relative: Callable[[str], str]) -> dict:
    """Write the parts (see the module doc) and return the layout; `relative(path)` is how a skipped
    file is recorded."""
    parts.mkdir(exist_ok=True)
    part_tokens = min(options["shard_tokens"], MAX_PART_TOKENS)
    eot, dtype = eot_of(options), shards.token_dtype(options["vocab_size"])
    sizes, done_docs = _finished_parts(parts, eot)
    stats = _src.SourceStats()
    pieces = _src.iter_pieces(srcs, text_field=options["text_field"], split=options["split"],
                              strict=options["strict"], stats=stats, warn=warn)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(worker_pool(workers, codec))  # before the bar: tqdm starts a thread
        bar = stack.enter_context(
            tqdm(desc="tokenizing", unit=" docs", initial=done_docs, disable=not progress, mininterval=bar_interval())
        )
        pieces = _skip_documents(pieces, done_docs, parts.parent)  # finished parts' documents: read, not tokenized
        buffer: list[np.ndarray] = []
        buffered = tokens = 0
        t0 = last = time.perf_counter()
        for arr, ndocs in encode_stream(chunks(pieces), codec, pool, workers):
            buffer.append(arr)
            buffered += arr.size
            tokens += arr.size
            while buffered >= part_tokens:  # cut at the first document start at/after part_tokens
                cat = np.concatenate(buffer)
                hits = np.flatnonzero(cat[part_tokens:] == eot)
                cut = part_tokens + int(hits[0]) if hits.size else cat.size
                shards.write_shard(part_path(parts, len(sizes)), [cat[:cut]], cut, dtype, eot)
                sizes.append(cut)
                buffer = [cat[cut:]] if cut < cat.size else []
                buffered = cat.size - cut
            bar.update(ndocs)
            now = time.perf_counter()
            if now - last > 0.5:
                last = now
                bar.set_postfix_str(f"{tokens / 1e6:.2f}M tokens, {tokens / (now - t0) / 1e6:.2f}M tok/s", refresh=False)
        if buffered:
            cat = np.concatenate(buffer)
            shards.write_shard(part_path(parts, len(sizes)), [cat], cat.size, dtype, eot)
            sizes.append(int(cat.size))
        bar.set_postfix_str(f"{tokens / 1e6:.2f}M tokens, {tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s")
    if stats.documents == 0:
        skipped = f", {len(stats.skipped)} files skipped" if stats.skipped else ""
        raise GPTForgeError(
            f"no documents found in {', '.join(options['sources'])} ({stats.files_read} files read{skipped}, "
            f"{stats.empty} empty documents)"
        )
    st = stats.to_dict()
    st["skipped_files"] = [f"{relative(f)}: {why}" for f, why in stats.skipped[: len(st["skipped_files"])]]
    layout = {"parts": sizes, "stats": st}
    layout.update(val_boundary(parts, sizes, options, stats.documents))
    shards.write_json(parts / LAYOUT, layout)
    return layout


def val_boundary(parts: Path, sizes: list[int], options: dict, n_docs: int) -> dict:
    """Where val ends: the first document start at or after the target (see data/prepare.py's doc)."""
    total = sum(sizes)
    explicit = options["val_tokens"] != "auto"
    target = options["val_tokens"] if explicit else default_val_tokens(total)
    end, val_docs, offset, last_start = total, n_docs, 0, 0
    if target <= 0:
        end, val_docs = 0, 0
    else:
        docs_before = 0
        for i, n in enumerate(sizes):
            starts = np.flatnonzero(load_part(parts, i) == eot_of(options)) + offset
            if starts.size:
                last_start = int(starts[-1])
            after = np.flatnonzero(starts >= target)
            if after.size:
                end, val_docs = int(starts[after[0]]), docs_before + int(after[0])
                break
            docs_before += starts.size
            offset += n
    if end == total and target > 0:
        if explicit:
            raise GPTForgeError(
                f"--val-tokens {target} would put all {n_docs} documents ({total} tokens) in the validation "
                "split; lower it or add data"
            )
        end, val_docs = last_start, n_docs - 1  # keep the last document for train
    if not explicit and target >= VAL_CUT_MIN and not target <= end <= 2 * target:
        # whole documents cannot make a split near the target (one long document, as
        # tinyshakespeare's input.txt, or a first document far longer than it): cut inside one
        end, val_docs = target, _documents_before(parts, sizes, target, eot_of(options))
    return {"val_end": end, "val_documents": val_docs, "val_target": target, "total_tokens": total, "documents": n_docs}


def _documents_before(parts: Path, sizes: list[int], end: int, eot: int) -> int:
    """Documents that begin before token `end` (EOT tokens in [0, end))."""
    count, offset = 0, 0
    for i, n in enumerate(sizes):
        if offset >= end:
            break
        count += int(np.count_nonzero(load_part(parts, i)[: end - offset] == eot))
        offset += n
    return count
