"""Documents -> tokens in many processes -> fixed-size shards; resumable after kill -9.

The tokenizer (`tokenizer`): "gpt2" (GPT-2's BPE, the default), a trained tokenizer (its
directory, or a prepared data directory whose tokenizer to reuse), or "train:N": first train an
N-id byte-level BPE on a sample of the same sources (data/tokenizer_sample.py). A trained
tokenizer is stored with the data, in `DIR/tokenizer/` (a tokenizer directory), and the manifest
names it and the sha256 of its gptforge-tokenizer.json; its vocabulary sets the shard dtype
(uint16 up to 65,536 ids, else uint32).

Two stages, each made of atomically written files, so an interrupted run is continued by running
the same command again and ends byte-identical to an uninterrupted one:

1. tokenize: documents (sources.py) go in chunks to `workers` processes (ordered, a bounded number
   in flight), each document as [EOT] + encode_ordinary(text). (With train:N the tokenizer is
   trained first, into `DIR/tokenizer/`, written atomically: a re-run finds it there.) The token stream is cut at document
   boundaries into parts `.parts/part_{i:06d}.npy` of about min(shard_tokens, 16M) tokens. On a
   re-run, finished parts are kept and their documents (counted by their EOT tokens) are read
   but not tokenized again. When all parts exist, `.parts/layout.json` records their sizes, the
   validation boundary and the source statistics.
2. cut: the stream is split into val = the first documents, train = the rest, and each split into
   `{split}_{index:06d}.npy` shards of `shard_tokens` tokens (the last one shorter), copied from the
   parts (a part is deleted once every shard that needs it exists). Shards already present are
   only hashed. manifest.json is written last; then the parts are removed.

The validation rule: `val_tokens` given -> val is the smallest prefix of whole documents with at
least that many tokens (an error if it would leave train empty). Default -> the target is 0.5% of
all tokens, capped at 10M tokens, but at least `VAL_MIN` tokens (one evaluation pass of the default
config) or 10% of a small corpus, whichever is less (`default_val_tokens`), taken the same way,
but never every document. Where whole documents cannot give between 1x and 2x that default target
(a single long document, such as tinyshakespeare's input.txt; or a first document far longer than
the target) and the target is at least `VAL_CUT_MIN` tokens, val is exactly the first `target`
tokens, cut inside a document. A tiny single-document corpus keeps an empty val split.

The options that shape the output (sources, the fingerprint of the input files, text field, split,
strict, shard size, val tokens, tokenizer) are saved before any work; re-running with others into
the same directory is an error unless `overwrite`. `workers` never changes the output.

Local source paths are recorded portably (`portable_path`): relative to the output directory
where the two share a directory below the filesystem root, else absolute with the home directory
written `~`; so a dataset copied to another machine carries no path of the first one's home. They
are for people to read: the fingerprint, not the recorded path, decides whether the inputs are the
same, so moving the output directory (which changes the relative path) is not a change of options,
and manifests written with absolute paths read as before.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from gptforge import tokenizer
from gptforge import tokenizer as tokenizer_mod  # `prepare` has a parameter named tokenizer
from gptforge.data import shards
from gptforge.data import sources as _src
from gptforge.errors import GPTForgeError
from gptforge.fsutil import remove_stale_tmp

DEFAULT_SHARD_TOKENS = 100_000_000
VAL_FRACTION = 0.005  # default validation split: 0.5% of all tokens ...
VAL_CAP = 10_000_000  # ... but at most 10M tokens
VAL_MIN = 32_769  # ... and at least this (run.eval_tokens 32,768 targets: 8 batches of the default 16 x 256) ...
VAL_SMALL_FRACTION = 0.10  # ... or this fraction of a small corpus, whichever is less
VAL_CUT_MIN = 1_024  # default targets from this size on may cut inside a document (see _val_boundary)
VAL_RULE = ("first whole documents until >= min(10M, max(ceil(0.5% of all tokens), min(32,769, ceil(10% of all "
            "tokens)))), never every document; cut inside a document when whole ones would give less than that "
            "or more than twice it (targets >= 1,024 tokens)")
MAX_PART_TOKENS = 1 << 24
CHUNK_CHARS = 1 << 19  # text per worker task: big enough to amortize IPC, small enough to balance
IN_FLIGHT_PER_WORKER = 4
STATE = ".prepare-state.json"
PARTS = ".parts"
LAYOUT = "layout.json"
LOCK = ".lock"


class OptionsMismatch(GPTForgeError):
    """The output directory holds data prepared (or being prepared) with other options."""


class _KeepState(GPTForgeError):
    """An error after which the unfinished work is kept for a re-run (not an input problem)."""


def default_cache_dir() -> Path:
    """$GPTFORGE_CACHE, else $XDG_CACHE_HOME/gptforge, else ~/.cache/gptforge."""
    from gptforge.fsutil import cache_root

    return cache_root()


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_val_tokens(total_tokens: int) -> int:
    """0.5% of a large corpus (at most 10M tokens); enough for the default evaluation, but at most
    10%, of a small one (so that a tinyshakespeare-sized corpus trains and evaluates with the defaults)."""
    small = min(VAL_MIN, math.ceil(total_tokens * VAL_SMALL_FRACTION))
    return min(VAL_CAP, max(math.ceil(total_tokens * VAL_FRACTION), small))


def ensure_default_corpus(workers: int | None = None, progress: bool = True, tokenizer: str = "gpt2") -> Path:
    """Prepare `python-stdlib` into <cache>/data/python-stdlib (GPT-2's BPE) or, for tokenizer
    "train:N", <cache>/data/python-stdlib-trainN (its own N-id BPE, trained on it first), unless
    already complete; return it."""
    name = _src.STDLIB if tokenizer == "gpt2" else f"{_src.STDLIB}-{tokenizer.replace(':', '')}"
    out = default_cache_dir() / "data" / name
    try:
        prepare([_src.STDLIB], out, workers=workers, progress=progress, tokenizer=tokenizer)
    except OptionsMismatch:  # another Python (another stdlib) prepared it: redo it for this one
        prepare([_src.STDLIB], out, workers=workers, progress=progress, tokenizer=tokenizer, overwrite=True)
    return out


# ---------------------------------------------------------------------------------------------
# tokenization (runs in the worker processes, or inline with workers=1)

TOKENIZER_DIR = "tokenizer"  # a trained tokenizer's directory inside the data directory
TRAIN_PREFIX = "train:"
_CODEC: tuple[str | None, str | None] = (None, None)  # (tokenizer spec, sha256) of this process's encoding


def _eot(options: dict) -> int:
    return options["vocab_size"] - 1  # GPT-2's <|endoftext|> and a trained tokenizer's are the last id


def _dtype(options: dict) -> np.dtype:
    return shards.token_dtype(options["vocab_size"])


def _encode(enc, text: str) -> np.ndarray:
    # encode with no allowed and no disallowed specials is encode_ordinary (tiktoken's contract),
    # and encode_to_numpy skips building a Python list of ints
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except (AttributeError, UnicodeEncodeError):  # older tiktoken; lone surrogates
        return np.asarray(enc.encode_ordinary(text), dtype=np.uint32)


def encode_documents(texts: list[str]) -> np.ndarray:
    """[EOT] + tokens of each text, concatenated, in the shard dtype (this process's tokenizer)."""
    tok = tokenizer.get(*_CODEC)
    dtype, eot = shards.token_dtype(tok.vocab_size), np.array([tok.eot_id], dtype=np.uint32)
    pieces = []
    for text in texts:
        pieces.append(eot)
        pieces.append(_encode(tok.enc, text))
    return np.concatenate(pieces).astype(dtype) if pieces else np.empty(0, dtype)


def _watch_parent(parent: int) -> None:
    while True:  # a worker must not outlive a parent killed with -9
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(parent: int, codec: tuple[str | None, str | None]) -> None:
    global _CODEC
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    _CODEC = codec
    tokenizer.get(*codec)


def _bar_interval() -> float:
    return 0.2 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not 5 a second


def _chunks(docs: Iterable[str], max_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@contextlib.contextmanager
def _worker_pool(workers: int):
    """The tokenizer processes (None for workers=1: tokenize inline).

    fork while this process runs no other Python thread (fast, and works from any script, even one
    without an `if __name__ == "__main__"` guard); spawn otherwise, since forking a threaded
    process can hand the children a lock held by another thread.
    """
    if workers == 1:
        yield None
        return
    from tqdm._monitor import TMonitor  # tqdm's idle monitor thread never holds a lock a child needs

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not isinstance(t, TMonitor)]
    method = "fork" if "fork" in mp.get_all_start_methods() and not others else "spawn"
    ctx = mp.get_context(method)
    if method == "fork":
        tokenizer.get(*_CODEC)  # built once here, shared with the children
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), _CODEC)) as ex:
        if method == "fork":
            ex.submit(int).result()  # fork every worker now, before any thread of ours starts
        yield ex


def _encode_stream(chunks: Iterable[list[str]], pool, workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, number of documents) per chunk, in input order, tokenized by the pool's processes.

    At most IN_FLIGHT_PER_WORKER * workers chunks are submitted ahead: memory stays bounded however
    large the corpus (Pool.imap would read the whole input ahead).
    """
    if pool is None:
        for chunk in chunks:
            yield encode_documents(chunk), len(chunk)
        return
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append((pool.submit(encode_documents, chunk), len(chunk)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                fut, n = pending.popleft()
                yield fut.result(), n
        while pending:
            fut, n = pending.popleft()
            yield fut.result(), n
    except BrokenProcessPool as e:
        raise _KeepState(
            "a tokenizer worker process died (out of memory? or, if called from a script, is its main code "
            "under `if __name__ == '__main__':`?); run the same command again to resume"
        ) from e
    finally:
        for fut, _ in pending:
            fut.cancel()


# ---------------------------------------------------------------------------------------------
# the output directory: options, lock, state


def portable_path(path: str | os.PathLike, out: Path) -> str:
    """A local path as a shareable dataset records it (see the module doc)."""
    p, d = Path(path).expanduser().resolve(), Path(out).expanduser().resolve()
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


def _portable_spec(src: _src.Source, out: Path) -> str:
    return src.spec if src.is_hf or src.spec == _src.STDLIB else portable_path(src.spec, out)


def _same_options(old: dict | None, new: dict) -> bool:
    """Equal but for the recorded source paths (the fingerprint covers the sources themselves)."""
    if not isinstance(old, dict):
        return False
    return {k: v for k, v in old.items() if k != "sources"} == {k: v for k, v in new.items() if k != "sources"}


def _options(srcs: list[_src.Source], *, shard_tokens, val_tokens, text_field, split, strict, out: Path,
             tok_spec: dict) -> dict:
    return {
        "sources": [_portable_spec(s, out) for s in srcs],
        "inputs_sha256": _src.fingerprint(srcs),
        "text_field": text_field,
        "split": split,
        "strict": strict,
        "shard_tokens": shard_tokens,
        "val_tokens": "auto" if val_tokens is None else val_tokens,
        **tok_spec,  # gpt2: {"tokenizer": "gpt2", "vocab_size": 50257}, as before trained tokenizers
    }


def _diff(old: dict, new: dict) -> str:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or (key == "sources" and old.get("inputs_sha256") == new.get("inputs_sha256")):
            continue  # the same inputs, recorded from another place
        if key == "inputs_sha256":
            out.append("the input files changed (size, modification time or place)")
        else:
            ra, rb = repr(a), repr(b)
            out.append(f"{key} {ra[:60]} -> {rb[:60]}")
    return ", ".join(out) or "unknown differences"


@contextlib.contextmanager
def _locked(out: Path, progress: bool):
    """One preparation per directory at a time (e.g. every torchrun rank calling ensure_default_corpus)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"gptforge: waiting for another process preparing {out}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GPTForgeError(f"{path}: unreadable ({e}); pass --overwrite to prepare again") from e


def _clear(out: Path) -> None:
    """Remove everything prepare writes in `out` (and nothing else)."""
    for p in shards.listed_files(out):
        p.unlink()
    for name in (shards.MANIFEST, STATE):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    shutil.rmtree(out / PARTS, ignore_errors=True)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    remove_stale_tmp(out)


def _finished(out: Path, options: dict, overwrite: bool) -> dict | None:
    """The manifest if `out` already holds this exact preparation; None to (re)start work."""
    if overwrite:
        _clear(out)
        return None
    if (out / shards.MANIFEST).exists():
        manifest = _read_json(out / shards.MANIFEST)
        old = manifest.get("options") if isinstance(manifest, dict) else None
        if not _same_options(old, options):
            raise OptionsMismatch(
                f"{out}: already holds shards prepared with other options ({_diff(old or {}, options)}); "
                "pass --overwrite to replace them"
            )
        manifest = shards.read_manifest(out)
        for split in manifest["splits"]:
            shards.open_split(out, split, manifest)  # cheap checks: a damaged result is not "done"
        shutil.rmtree(out / PARTS, ignore_errors=True)  # killed after the manifest, before cleanup
        with contextlib.suppress(FileNotFoundError):
            (out / STATE).unlink()
        return manifest
    if (out / STATE).exists():
        state = _read_json(out / STATE)
        old = state.get("options") if isinstance(state, dict) else None
        if not _same_options(old, options):
            raise OptionsMismatch(
                f"{out}: holds an unfinished preparation with other options ({_diff(old or {}, options)}); "
                "re-run that command to finish it, or pass --overwrite"
            )
        return None
    if shards.listed_files(out):
        raise GPTForgeError(f"{out}: holds shard files but no {shards.MANIFEST}; pass --overwrite to replace them")
    return None


# ---------------------------------------------------------------------------------------------
# stage 1: documents -> parts


def _part_path(parts: Path, i: int) -> Path:
    return parts / f"part_{i:06d}.npy"


def _count_eot(arr: np.ndarray, eot: int, block: int = 1 << 24) -> int:
    return sum(int(np.count_nonzero(arr[i : i + block] == eot)) for i in range(0, arr.shape[0], block))


def _load_part(parts: Path, i: int) -> np.ndarray:
    path = _part_path(parts, i)
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise GPTForgeError(f"{path}: unfinished preparation is damaged ({e}); pass --overwrite to start again") from e


def _tokenize(srcs, parts: Path, options: dict, workers: int, progress: bool) -> dict:
    parts.mkdir(exist_ok=True)
    part_tokens = min(options["shard_tokens"], MAX_PART_TOKENS)
    eot, dtype = _eot(options), _dtype(options)
    sizes: list[int] = []
    done_docs = 0
    while _part_path(parts, len(sizes)).exists():  # parts are written in order, each atomically
        arr = _load_part(parts, len(sizes))
        sizes.append(int(arr.shape[0]))
        done_docs += _count_eot(arr, eot)
        del arr
    stats = _src.SourceStats()
    docs = _src.iter_documents(
        srcs, text_field=options["text_field"], split=options["split"], strict=options["strict"], stats=stats,
        warn=lambda msg: tqdm.write(f"gptforge: warning: {msg}", file=sys.stderr),  # not through the bar
    )
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(_worker_pool(workers))  # before the bar: tqdm starts a thread
        bar = stack.enter_context(
            tqdm(desc="tokenizing", unit=" docs", initial=done_docs, disable=not progress, mininterval=_bar_interval())
        )
        for _ in range(done_docs):  # documents of finished parts: read again, not tokenized again
            if next(docs, None) is None:
                raise GPTForgeError(
                    f"the sources now hold fewer documents than the unfinished preparation in {parts.parent} "
                    "already tokenized; pass --overwrite to start again"
                )
        buffer: list[np.ndarray] = []
        buffered = tokens = 0
        t0 = last = time.perf_counter()
        for arr, ndocs in _encode_stream(_chunks(docs), pool, workers):
            buffer.append(arr)
            buffered += arr.size
            tokens += arr.size
            while buffered >= part_tokens:  # cut at the first document start at/after part_tokens
                cat = np.concatenate(buffer)
                hits = np.flatnonzero(cat[part_tokens:] == eot)
                cut = part_tokens + int(hits[0]) if hits.size else cat.size
                shards.write_shard(_part_path(parts, len(sizes)), [cat[:cut]], cut, dtype, eot)
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
            shards.write_shard(_part_path(parts, len(sizes)), [cat], cat.size, dtype, eot)
            sizes.append(int(cat.size))
        bar.set_postfix_str(f"{tokens / 1e6:.2f}M tokens, {tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s")
    if stats.documents == 0:
        skipped = f", {len(stats.skipped)} files skipped" if stats.skipped else ""
        raise GPTForgeError(
            f"no documents found in {', '.join(options['sources'])} ({stats.files_read} files read{skipped}, "
            f"{stats.empty} empty documents)"
        )
    st = stats.to_dict()
    st["skipped_files"] = [f"{portable_path(f, parts.parent)}: {why}" for f, why in stats.skipped[: len(st["skipped_files"])]]
    layout = {"parts": sizes, "stats": st}
    layout.update(_val_boundary(parts, sizes, options, stats.documents))
    shards.write_json(parts / LAYOUT, layout)
    return layout


def _val_boundary(parts: Path, sizes: list[int], options: dict, n_docs: int) -> dict:
    """Where val ends: the first document start at or after the target (see the module doc)."""
    total = sum(sizes)
    explicit = options["val_tokens"] != "auto"
    target = options["val_tokens"] if explicit else default_val_tokens(total)
    end, val_docs, offset, last_start = total, n_docs, 0, 0
    if target <= 0:
        end, val_docs = 0, 0
    else:
        docs_before = 0
        for i, n in enumerate(sizes):
            starts = np.flatnonzero(_load_part(parts, i) == _eot(options)) + offset
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
        end, val_docs = target, _documents_before(parts, sizes, target, _eot(options))
    return {"val_end": end, "val_documents": val_docs, "val_target": target, "total_tokens": total, "documents": n_docs}


def _documents_before(parts: Path, sizes: list[int], end: int, eot: int) -> int:
    """Documents that begin before token `end` (EOT tokens in [0, end))."""
    count, offset = 0, 0
    for i, n in enumerate(sizes):
        if offset >= end:
            break
        count += int(np.count_nonzero(_load_part(parts, i)[: end - offset] == eot))
        offset += n
    return count


# ---------------------------------------------------------------------------------------------
# stage 2: parts -> shards


def _blocks(parts: Path, starts: np.ndarray, sizes: list[int], a: int, b: int) -> Iterator[np.ndarray]:
    """Tokens [a, b) of the stream, read from the parts in bounded blocks."""
    i = int(np.searchsorted(starts, a, side="right")) - 1
    pos = a
    while pos < b:
        arr = _load_part(parts, i)
        lo, hi = pos - int(starts[i]), min(b, int(starts[i]) + sizes[i]) - int(starts[i])
        for j in range(lo, hi, shards._BLOCK):
            yield arr[j : min(hi, j + shards._BLOCK)]
        pos += hi - lo
        del arr
        i += 1


def _cut(out: Path, parts: Path, layout: dict, options: dict, tok: tokenizer.Tokenizer, progress: bool) -> dict:
    sizes = layout["parts"]
    eot, dtype = _eot(options), _dtype(options)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total, vb, n = int(starts[-1]), layout["val_end"], options["shard_tokens"]
    plan = [
        (split, i, s, min(hi, s + n))
        for split, lo, hi in (("val", 0, vb), ("train", vb, total))
        for i, s in enumerate(range(lo, hi, n))
    ]
    entries: dict[str, list[dict]] = {"val": [], "train": []}
    bar = tqdm(total=total, desc="writing shards", unit=" tok", unit_scale=True, disable=not progress, mininterval=_bar_interval())
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
                        _part_path(parts, j).unlink()
    st = layout["stats"]
    val_docs = layout["val_documents"]
    named = {}
    if tok.trained:  # stored with the data: the manifest names the file and its sha256
        named = {"tokenizer_file": f"{TOKENIZER_DIR}/{tokenizer.TOKENIZER_FILE}", "tokenizer_sha256": tok.file_sha256,
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


# ---------------------------------------------------------------------------------------------


def _tokenizer_choice(spec, max_chars: int, pattern: str) -> tuple[dict, tokenizer.Tokenizer | None]:
    """The options that name the tokenizer, and the tokenizer (None for train:N: trained later)."""
    if isinstance(spec, str) and spec.startswith(TRAIN_PREFIX):
        n = spec[len(TRAIN_PREFIX):].replace("_", "")
        if not n.isdigit():
            raise GPTForgeError(f"--tokenizer {spec!r}: expected train:N with N the vocabulary size, e.g. train:8192")
        tokenizer.check_vocab_size(int(n), f"--tokenizer {spec}: vocabulary size")
        if pattern not in tokenizer.PATTERNS:
            raise GPTForgeError(f"tokenizer pattern {pattern!r}: expected one of {', '.join(tokenizer.PATTERNS)}")
        if not isinstance(max_chars, int) or max_chars < 1:
            raise GPTForgeError(f"--tokenizer-max-chars must be a positive integer, got {max_chars!r}")
        return {"tokenizer": f"{TRAIN_PREFIX}{int(n)}", "vocab_size": int(n), "tokenizer_pattern": pattern,
                "tokenizer_max_chars": max_chars}, None
    if spec is None or isinstance(spec, tokenizer.Tokenizer):
        tok = spec or tokenizer.Tokenizer()
    elif Path(spec).is_dir() and (Path(spec) / shards.MANIFEST).is_file():  # a prepared data directory's
        tok = shards.data_tokenizer(spec)
    else:
        tok = tokenizer.Tokenizer.load(spec)
    return {"tokenizer": tok.name, "vocab_size": tok.vocab_size}, tok


def _stored_tokenizer(out: Path, tok: tokenizer.Tokenizer | None, options: dict, resumed: bool, sources, text_field,
                      split, strict, progress) -> tokenizer.Tokenizer:
    """The preparation's tokenizer, stored in out/tokenizer/ when trained: trained there first
    (train:N; a re-run after an interruption finds it), or copied there."""
    tdir = out / TOKENIZER_DIR
    if tok is not None and not tok.trained:
        return tok
    if tok is None:
        if resumed and (tdir / tokenizer.TOKENIZER_FILE).is_file():
            return tokenizer.Tokenizer.load(tdir)
        shutil.rmtree(tdir, ignore_errors=True)
        from gptforge.data.tokenizer_sample import train_tokenizer

        return train_tokenizer(sources, tdir, options["vocab_size"], max_chars=options["tokenizer_max_chars"],
                               pattern=options["tokenizer_pattern"], text_field=text_field, split=split,
                               strict=strict, progress=progress)
    with contextlib.suppress(GPTForgeError):
        if tokenizer.Tokenizer.load(tdir).name == tok.name:
            return tokenizer.Tokenizer.load(tdir)
    tok.save(tdir, overwrite=True)
    return tokenizer.Tokenizer.load(tdir)


def _check_args(srcs, shard_tokens, val_tokens, workers, text_field) -> None:
    problems = []
    if isinstance(srcs, (str, os.PathLike)):
        problems.append("sources must be a list of source names, not one string")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        problems.append(f"--shard-tokens must be a positive integer, got {shard_tokens!r}")
    if val_tokens is not None and (not isinstance(val_tokens, int) or val_tokens < 0):
        problems.append(f"--val-tokens must be an integer >= 0, got {val_tokens!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        problems.append(f"--workers must be a positive integer, got {workers!r}")
    if not text_field:
        problems.append("--text-field must not be empty")
    if problems:
        raise GPTForgeError("; ".join(problems))


def prepare(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_tokens: int | None = None,
    workers: int | None = None,
    text_field: str = "text",
    split: str = "train",
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tokenizer: "str | os.PathLike | tokenizer_mod.Tokenizer" = "gpt2",
    tokenizer_max_chars: int | None = None,
    tokenizer_pattern: str | None = None,
) -> dict:
    """Tokenize `sources` into shards in `out_dir` and return the manifest (see the module doc).
    tokenizer: "gpt2", "train:N", a tokenizer directory or file, a prepared data directory (its
    tokenizer), or a Tokenizer. tokenizer_max_chars / tokenizer_pattern: for train:N.

    Re-running after an interruption continues; re-running when done returns the manifest at once.
    """
    global _CODEC
    from gptforge.data.tokenizer_sample import DEFAULT_MAX_CHARS

    _check_args(sources, shard_tokens, val_tokens, workers, text_field)
    tok_spec, tok = _tokenizer_choice(
        None if tokenizer == "gpt2" else tokenizer, tokenizer_max_chars or DEFAULT_MAX_CHARS,
        tokenizer_pattern or tokenizer_mod.DEFAULT_PATTERN)
    srcs = _src.resolve_all(sources)
    out = Path(out_dir).expanduser()
    options = _options(srcs, shard_tokens=shard_tokens, val_tokens=val_tokens, text_field=text_field, split=split,
                       strict=strict, out=out, tok_spec=tok_spec)
    workers = workers or default_workers()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPTForgeError(f"{out}: cannot create the output directory ({e.strerror})") from e
    with _locked(out, progress):
        manifest = _finished(out, options, overwrite)
        if manifest is not None:
            return manifest
        parts = out / PARTS
        remove_stale_tmp(out)
        remove_stale_tmp(parts)
        resumed = (out / STATE).exists()
        if not resumed:
            shards.write_json(out / STATE, {"options": options})
        try:
            tok = _stored_tokenizer(out, tok, options, resumed, sources, text_field, split, strict, progress)
            if (parts / LAYOUT).exists():
                layout = _read_json(parts / LAYOUT)
            else:
                _CODEC = (str(tok.file), tok.file_sha256) if tok.trained else (None, None)
                layout = _tokenize(srcs, parts, options, workers, progress)
        except GPTForgeError as e:
            if not isinstance(e, _KeepState):
                _clear(out)  # an input problem: the unfinished work cannot be resumed as is
            raise
        finally:
            _CODEC = (None, None)
        manifest = _cut(out, parts, layout, options, tok, progress)
        shards.write_manifest(out, manifest)
        shutil.rmtree(parts, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (out / STATE).unlink()
        return manifest
