"""Before training trusts the shards: every shard's sha256 against manifest.json, remembered.

`open_split` only checks what is cheap (header, dtype, shape, size), so a flipped byte inside the
payload would train silently. `verify_shards` hashes every shard of every split with one thread
per core (hashlib and file reads release the GIL, so threads hash in parallel) behind a progress
bar, and stops with one line naming the first shard that differs. What matched is remembered in
`<gptforge cache>/verified/<hash of the data dir's path>.json`, keyed by the shard's name, size,
mtime, ctime and inode and the manifest's digest, so a restart hashes nothing: any write to a
shard (or a copy put in its place, even one that keeps the mtime) changes a key and is hashed
again. The cache lives outside the data directory, which stays read-only and byte-identical to
what `prepare` wrote.

The trainer starts the hashing in the background (`start`) while it builds the model, and waits
for it (`ShardCheck.wait`) before the first step. Under torchrun only each node's local rank 0
hashes; the other ranks wait for its verdict.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from gptforge.data import shards
from gptforge.errors import GPTForgeError
from gptforge.data.encode import default_workers
from gptforge.fsutil import cache_root, read_json, sha256_file, write_json

CACHE_VERSION = 1
BLOCK = 1 << 20  # bytes read per hash update: as fast as larger blocks, and little memory per thread
LONG = 1 << 30  # bytes to hash from which a log is told (before, if not a terminal, and after)


def cache_path(data_dir: str | os.PathLike) -> Path:
    key = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:20]
    return cache_root() / "verified" / f"{key}.json"


def _key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_cache(path: Path, data_dir: Path) -> dict[str, dict]:
    """The remembered shards of data_dir; anything unreadable or foreign counts as nothing remembered."""
    try:
        cache = read_json(path)
    except (OSError, GPTForgeError):
        return {}
    if cache.get("version") != CACHE_VERSION or cache.get("data_dir") != str(data_dir):
        return {}
    found = cache.get("shards")
    return found if isinstance(found, dict) else {}


def _write_cache(path: Path, data_dir: Path, verified: dict[str, dict]) -> None:
    body = {"version": CACHE_VERSION, "data_dir": str(data_dir), "shards": verified}
    try:
        _prune(path.parent)
        write_json(path, body)
    except OSError:  # a read-only cache: the next start hashes again, nothing worse
        pass


def _prune(cache_dir: Path) -> None:
    """Forget data directories that no longer exist (temporary ones, deleted datasets)."""
    if not cache_dir.is_dir():
        return
    for p in cache_dir.glob("*.json"):
        try:
            gone = not Path(read_json(p)["data_dir"]).is_dir()
        except (OSError, GPTForgeError, KeyError, TypeError):
            gone = True
        if gone:
            p.unlink(missing_ok=True)


def _hash_all(paths: list[Path], workers: int, progress: Callable[[int], None] | None) -> dict[Path, str | OSError]:
    """sha256 of each path, by `workers` daemon threads (an error elsewhere never waits for them)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for p in sorted(paths, key=lambda p: -p.stat().st_size):  # largest first: balanced threads
        todo.put(p)
    out: dict[Path, str | OSError] = {}

    def work() -> None:
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            try:
                out[p] = sha256_file(p, block=BLOCK, progress=progress)
            except OSError as e:
                out[p] = e

    threads = [threading.Thread(target=work, name="gptforge-verify", daemon=True) for _ in range(max(1, min(workers, len(paths))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def verify_shards(data_dir: str | os.PathLike, manifest: dict | None = None, *, workers: int | None = None,
                  progress: bool = True, use_cache: bool = True) -> dict:
    """Check every shard of data_dir against manifest.json's sha256 (cheap checks first).

    Returns {"shards", "hashed", "cached", "bytes_hashed", "seconds"}; raises one GPTForgeError
    naming the first shard that differs (and how many more do).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    manifest = manifest if manifest is not None else shards.read_manifest(data_dir)
    dtype = np.dtype(manifest["dtype"])
    entries = [e for body in manifest["splits"].values() for e in body["shards"]]
    cpath = cache_path(data_dir)
    cache = _read_cache(cpath, data_dir) if use_cache else {}
    verified: dict[str, dict] = {}
    todo: dict[Path, tuple[dict, list[int]]] = {}
    for entry in entries:
        info = shards.check_shard(data_dir, entry, dtype)  # a truncated or foreign file: its own message
        key = _key(info.path)
        record = {"key": key, "sha256": entry["sha256"]}
        if cache.get(entry["file"]) == record:
            verified[entry["file"]] = record
        else:
            todo[info.path] = (entry, key)
    total = sum(key[0] for _, key in todo.values())
    tty = sys.stderr.isatty()
    if progress and not tty and total >= LONG:  # a log file: one line before a long wait, no bar
        print(f"gptforge: verifying {len(todo)} shards ({total / 2**30:.1f} GiB) against {shards.MANIFEST}",
              file=sys.stderr, flush=True)
    bar = tqdm(total=total, desc="verifying shards", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               disable=not (progress and todo and tty), leave=False)
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    with bar:
        digests = _hash_all(list(todo), workers or default_workers(), advance if progress and todo else None)
    problems = []
    for path, (entry, key) in todo.items():  # manifest order
        got = digests[path]
        if isinstance(got, OSError):
            problems.append(f"{path}: cannot read shard ({got.strerror or got})")
        elif got != entry["sha256"]:
            problems.append(f"{path}: sha256 is {got}, but {shards.MANIFEST} says {entry['sha256']} (the shard changed "
                            "after prepare: a flipped bit, a bad copy or disk)")
        elif _key(path) == key:  # unchanged while it was hashed: remember it
            verified[entry["file"]] = {"key": key, "sha256": entry["sha256"]}
    if use_cache and todo:
        _write_cache(cpath, data_dir, verified)
    if problems:
        more = f" (and {len(problems) - 1} more shards differ)" if len(problems) > 1 else ""
        raise GPTForgeError(f"{problems[0]}{more}; re-copy or re-prepare it, or train with --data.verify off")
    report = {"shards": len(entries), "hashed": len(todo), "cached": len(entries) - len(todo), "bytes_hashed": total,
              "seconds": time.perf_counter() - t0}
    if progress and total >= LONG:  # quick checks stay quiet
        remembered = f"; {report['cached']} unchanged since verified" if report["cached"] else ""
        print(f"gptforge: {len(todo)} shards ({total / 2**20:,.1f} MiB) match {shards.MANIFEST}, hashed in "
              f"{report['seconds']:.1f} s{remembered}", file=sys.stderr, flush=True)
    return report


class ShardCheck:
    """Shard verification running in a background thread while the trainer builds the model."""

    def __init__(self, data_dir: Path | None, progress: bool = True, workers: int | None = None):
        self.report: dict | None = None
        self.error: BaseException | None = None
        self._thread = None
        if data_dir is not None:
            self._thread = threading.Thread(target=self._run, args=(data_dir, progress, workers),
                                            name="gptforge-verify-shards", daemon=True)
            self._thread.start()

    def _run(self, data_dir: Path, progress: bool, workers: int | None) -> None:
        try:
            self.report = verify_shards(data_dir, workers=workers, progress=progress)
        except BaseException as e:  # handed to the thread that waits
            self.error = e

    def wait(self, agree: Callable[[bool], bool] | None = None) -> dict | None:
        """Join; raise the verification error. `agree(ok)` -> whether every rank is ok (under
        torchrun an all-reduce: the ranks that did not hash learn the verdict of those that did)."""
        if self._thread is not None:
            self._thread.join()
        ok = self.error is None
        if agree is not None and not agree(ok) and ok:
            raise GPTForgeError("shard verification failed on another rank (its error names the shard)")
        if self.error is not None:
            raise self.error
        return self.report


def start(data_dir: str | os.PathLike, *, enabled: bool = True, hashes_here: bool = True, progress: bool = True,
          workers: int | None = None) -> ShardCheck:
    """Begin verifying data_dir in the background (a no-op when disabled or on a rank that does not hash)."""
    return ShardCheck(Path(data_dir) if enabled and hashes_here else None, progress=progress, workers=workers)
