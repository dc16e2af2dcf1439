"""Tokenizing documents in worker processes: the codec every task carries, the pool, the stream.

A task is (codec, pieces): the codec names the tokenizer (its file and sha256, or GPT-2's), so a
worker needs no state set up beforehand; each process builds a tokenizer once and keeps it
(`Codec.tokenizer`). A document arrives as pieces (data/sources.py `iter_pieces`): its first piece
is preceded by <|endoftext|>, the document separator.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from gptforge import tokenizer as tk
from gptforge.data import shards
from gptforge.data.sources import Piece
from gptforge.errors import GPTForgeError

CHUNK_CHARS = 1 << 19  # text per worker task: big enough to amortize IPC, small enough to balance
IN_FLIGHT_PER_WORKER = 4

def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class KeepState(GPTForgeError):
    """An error after which the unfinished work is kept for a re-run (not an input problem)."""


@dataclass(frozen=True)
class Codec:
    """What a process needs to build the preparation's tokenizer: picklable, sent with every task."""

    file: str | None = None  # a trained tokenizer's gptforge-tokenizer.json; None: GPT-2's
    sha256: str | None = None

    @classmethod
    def of(cls, tok: tk.Tokenizer) -> "Codec":
        return cls(str(tok.file), tok.file_sha256) if tok.trained else cls()

    def tokenizer(self) -> tk.Tokenizer:
        return _tokenizer(self)


@functools.lru_cache(maxsize=4)
def _tokenizer(codec: Codec) -> tk.Tokenizer:  # built once per process and codec
    return tk.Tokenizer() if codec.file is None else tk.Tokenizer.load(codec.file, codec.sha256)


def _encode(enc, text: str) -> np.ndarray:
    # encode with no allowed and no disallowed specials is encode_ordinary (tiktoken's contract),
    # and encode_to_numpy skips building a Python list of ints
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except (AttributeError, UnicodeEncodeError):  # older tiktoken; lone surrogates
        return np.asarray(enc.encode_ordinary(text), dtype=np.uint32)


def encode_pieces(codec: Codec, pieces: list[Piece]) -> np.ndarray:
    """[EOT] before each document's first piece + the tokens of every piece, concatenated, in the
    shard dtype."""
    tok = codec.tokenizer()
    dtype, eot = shards.token_dtype(tok.vocab_size), np.array([tok.eot_id], dtype=np.uint32)
    out = []
    for text, first in pieces:
        if first:
            out.append(eot)
        out.append(_encode(tok.enc, text))
    return np.concatenate(out).astype(dtype) if out else np.empty(0, dtype)


def encode_documents(texts: list[str], codec: Codec = Codec()) -> np.ndarray:
    """[EOT] + tokens of each text, concatenated, in the shard dtype."""
    return encode_pieces(codec, [(t, True) for t in texts])


def chunks(pieces: Iterable[Piece], max_chars: int = CHUNK_CHARS) -> Iterator[list[Piece]]:
    """Consecutive pieces grouped into tasks of about `max_chars` characters."""
    chunk: list[Piece] = []
    size = 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[0])
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _watch_parent(parent: int) -> None:
    while True:  # a worker must not outlive a parent killed with -9
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(parent: int, codec: Codec) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    codec.tokenizer()  # built before the first task arrives


@contextlib.contextmanager
def worker_pool(workers: int, codec: Codec):
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
        codec.tokenizer()  # built once here, shared with the children
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), codec)) as ex:
        if method == "fork":
            ex.submit(int).result()  # fork every worker now, before any thread of ours starts
        yield ex


def encode_stream(tasks: Iterable[list[Piece]], codec: Codec, pool, workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, number of documents begun) per task, in input order, tokenized by the pool's
    processes (inline without one).

    At most IN_FLIGHT_PER_WORKER * workers tasks are submitted ahead: memory stays bounded however
    large the corpus (Pool.imap would read the whole input ahead).
    """
    def begun(task: list[Piece]) -> int:
        return sum(first for _, first in task)

    if pool is None:
        for task in tasks:
            yield encode_pieces(codec, task), begun(task)
        return
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append((pool.submit(encode_pieces, codec, task), begun(task)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                fut, n = pending.popleft()
                yield fut.result(), n
        while pending:
            fut, n = pending.popleft()
            yield fut.result(), n
    except BrokenProcessPool as e:
        raise KeepState(
            "a tokenizer worker process died (out of memory? or, if called from a script, is its main code "
            "under `if __name__ == '__main__':`?); run the same command again to resume"
        ) from e
    finally:
        for fut, _ in pending:
            fut.cancel()
