"""Shards -> (x, y) batches: memory-mapped, sequential or shuffled, split across ranks, exactly resumable.

The split is one stream of `num_tokens` tokens (its shards concatenated). Window i is the tokens
[i*T, i*T + T + 1): x = the first T, y = the last T. There are num_windows = (num_tokens - 1) // T
non-overlapping windows per epoch; a window that crosses a shard boundary is stitched from both.

One step hands out world_size * B windows (a global batch): rank r takes the r-th slice of B, so
the ranks together read exactly what one process would with batch world_size * B. `sequential`
takes windows in order; `shuffle` takes them in an order that is a permutation of the windows
seeded by (seed, epoch): every window exactly once per epoch. When the next global batch does not
fit in what is left of the epoch, the next epoch starts.

The position is (epoch, windows handed out in this epoch): `state_dict()` holds it with plain ints,
and a loader restored with `load_state_dict` yields exactly the batches the original would have.
With prefetch, batches are built ahead by a thread; the state still counts only batches handed out.

With packing `bestfit` the rows are documents packed to start on row starts instead of windows
(gptforge.data.packing; training only: `iter_epoch` still reads windows, so validation is the
same under either packing); the position is then (epoch, group, row in group).

Memory does not grow with the dataset: shards are opened (and checked) as memory maps, but batches
are read with pread straight into the batch buffer (see _Reader for why), and the shuffle order is
computed per position by a Feistel network, not stored as an array of num_windows indices.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gptforge.data import packing as pk
from gptforge.data import shards
from gptforge.errors import GPTForgeError

ORDERS = ("sequential", "shuffle")
STATE_VERSION = 1
PAD_MULTIPLE = 128  # a model may pad its vocabulary up to this multiple (gptforge.model.PAD_MULTIPLE)
_HAS_PREADV = hasattr(os, "preadv")
PERM_CHUNK = 1 << 16  # shuffle positions computed at a time


# ---------------------------------------------------------------------------------------------
# the shuffle order


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping multiplication)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n), evaluated per index in O(1) memory.

    A 6-round balanced Feistel network permutes [0, 4^h) (the smallest such domain >= n); values
    that land outside [0, n) are sent through again ("cycle walking") until they fall inside,
    which keeps it a bijection of [0, n).
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int, salt: tuple[int, ...] = ()):
        """salt: more key material (a bestfit group's rows are permuted per (epoch, group))."""
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.SeedSequence([seed & (2**64 - 1), epoch, *salt]).generate_state(self.ROUNDS, dtype=np.uint64)

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        x = self._round_trip(np.asarray(idx, dtype=np.uint64))
        outside = np.flatnonzero(x >= self.n)
        while outside.size:
            x[outside] = self._round_trip(x[outside])
            outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# reading windows from the memory maps


class _Reader:
    """Token spans and windows of one split, read with pread(2) straight into the batch buffer.

    Why not slices of the memory maps: a page fault on a memory map maps a whole run of pages (on
    Linux 6.x with large page-cache folios, ~175 KB per random window), so the resident set grows
    to the size of the data read; dropping the maps now and then to bound it makes every later
    read fault again, which cost more than the per-item design itself (3.3k vs 5.9k batches/s). A
    pread of a window copies its 2 KB from the page cache with no mapping at all: flat RSS, and the
    fastest random reads measured (benchmarks/bench_loader.py). Where os.preadv is missing, the
    memory maps are sliced instead. Used by one thread at a time.
    """

    MAX_OPEN = 128  # file descriptors kept open (least recently used closed first)

    def __init__(self, infos: list[shards.ShardInfo], seq_len: int):
        self.infos = infos
        self.T = seq_len
        self.sizes = np.array([i.num_tokens for i in infos], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.starts_list = self.starts.tolist()
        self.dtype = infos[0].dtype
        self.itemsize = self.dtype.itemsize
        self.offsets = [i.offset for i in infos]
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._maps = None if _HAS_PREADV else [i.memmap() for i in infos]

    def _fd(self, s: int) -> int:
        fd = self._fds.get(s)
        if fd is None:
            if len(self._fds) >= self.MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            try:
                fd = os.open(self.infos[s].path, os.O_RDONLY)
            except OSError as e:
                raise GPTForgeError(f"{self.infos[s].path}: cannot open shard ({e.strerror})") from e
            self._fds[s] = fd
        else:
            self._fds.move_to_end(s)
        return fd

    def _read(self, s: int, local: int, dst: np.ndarray) -> None:
        """dst (1-D, contiguous) <- tokens [local, local + dst.size) of shard s."""
        if self._maps is not None:
            dst[:] = self._maps[s][local : local + dst.size]
            return
        want = dst.size * self.itemsize
        got = os.preadv(self._fd(s), [memoryview(dst).cast("B")], self.offsets[s] + local * self.itemsize)
        if got != want:
            raise GPTForgeError(f"{self.infos[s].path}: read {got} of {want} bytes at token {local}: truncated since it was opened?")

    def span_into(self, start: int, dst: np.ndarray) -> None:
        """dst <- tokens [start, start + dst.size) of the split, stitched across shards (bisect)."""
        i = bisect.bisect_right(self.starts_list, start) - 1
        filled, length = 0, dst.size
        while filled < length:
            local = start + filled - self.starts_list[i]
            take = min(length - filled, self.starts_list[i + 1] - self.starts_list[i] - local)
            self._read(i, local, dst[filled : filled + take])
            filled += take
            i += 1

    def span(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=self.dtype)
        self.span_into(start, out)
        return out

    def plan(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For windows `ids`: their shard, their start in it, and whether they end in it."""
        pos = ids * self.T
        sid = np.searchsorted(self.starts, pos, side="right") - 1
        local = pos - self.starts[sid]
        return sid, local, local + self.T + 1 <= self.sizes[sid]

    def windows(self, ids: np.ndarray, sid: np.ndarray, local: np.ndarray, fits: np.ndarray) -> np.ndarray:
        """(len(ids), T+1) tokens of windows `ids` (with their plan): one read per window."""
        T = self.T
        out = np.empty((ids.size, T + 1), dtype=self.dtype)
        if self._maps is not None or not fits.all():
            for k, (s, lo, ok) in enumerate(zip(sid.tolist(), local.tolist(), fits.tolist())):
                if ok:
                    self._read(s, lo, out[k])
                else:  # crosses a shard boundary: stitched
                    self.span_into(int(ids[k]) * T, out[k])
            return out
        # the hot loop, inlined: one pread per window into its row of `out`
        row_bytes, isz, offsets, fds, preadv = (T + 1) * self.itemsize, self.itemsize, self.offsets, self._fds, os.preadv
        mv = memoryview(out).cast("B")
        for k, (s, lo) in enumerate(zip(sid.tolist(), local.tolist())):
            fd = fds.get(s)
            if fd is None:
                fd = self._fd(s)
            if preadv(fd, [mv[k * row_bytes : (k + 1) * row_bytes]], offsets[s] + lo * isz) != row_bytes:
                self._read(s, lo, out[k])  # raises with the shard's name
        return out

    def locate(self, pos: int) -> tuple[Path, int]:
        i = bisect.bisect_right(self.starts_list, pos) - 1
        return self.infos[i].path, pos - self.starts_list[i]

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        self._maps = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# ---------------------------------------------------------------------------------------------
# background prefetch


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Prefetcher:
    """A thread building the batches that follow (epoch, position), `depth` ahead; the position is
    whatever `produce` hands back (an int for windows, (group, row) for bestfit)."""

    def __init__(self, produce, epoch: int, position: int, depth: int, init=None):
        self.produce, self.init = produce, init
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(epoch, position), name="gptforge-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self, epoch: int, position: int) -> None:
        try:
            if self.init is not None:
                self.init()
            while not self.stop.is_set():
                item = self.produce(epoch, position)
                epoch, position = item[2], item[3]
                self._put(item)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))

    def get(self):
        item = self.q.get()
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def close(self) -> None:
        self.stop.set()
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.thread.join()


# ---------------------------------------------------------------------------------------------


class ShardLoader:
    """(x, y) int64 batches of shape (B, T) from a prepared directory (see the module doc)."""

    def __init__(
        self,
        data_dir,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 1024,
        order: str = "sequential",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device="cpu",
        prefetch: int = 0,
        vocab_size: int | None = None,
        allow_short: bool = False,
        packing: str = "windows",
    ):
        """allow_short: a split with fewer windows than one global batch is not an error; for
        evaluation, `iter_epoch` then yields what there is (see `_short_batch`). packing:
        windows, or bestfit (documents packed to start on row starts: gptforge.data.packing)."""
        problems = []
        for name, value, low in (("batch_size", batch_size, 1), ("seq_len", seq_len, 1), ("world_size", world_size, 1), ("prefetch", prefetch, 0)):
            if not isinstance(value, int) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        if order not in ORDERS:
            problems.append(f"order must be sequential or shuffle, got {order!r}")
        if packing not in pk.PACKINGS:
            problems.append(f"packing must be windows or bestfit, got {packing!r}")
        if not isinstance(rank, int) or not (isinstance(world_size, int) and 0 <= rank < max(world_size, 1)):
            problems.append(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if not isinstance(seed, int):
            problems.append(f"seed must be an integer, got {seed!r}")
        if problems:
            raise GPTForgeError("data loader: " + "; ".join(problems))
        self.data_dir = Path(data_dir)
        manifest = shards.read_manifest(self.data_dir)
        self.tokenizer_name: str = manifest["tokenizer"]
        self.vocab_size: int = manifest["vocab_size"]
        self.eot_id: int = manifest["eot_id"]
        if vocab_size is not None:
            padded = -(-self.vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE
            if not self.vocab_size <= vocab_size <= padded:
                raise GPTForgeError(
                    f"{self.data_dir}: shards were tokenized with {self.tokenizer_name} ({self.vocab_size} tokens), "
                    f"but the model's vocabulary has {vocab_size}; prepare the data with the model's tokenizer"
                )
        self.split, self.B, self.T = split, batch_size, seq_len
        self.order, self.seed, self.rank, self.world_size = order, seed, rank, world_size
        infos = shards.open_split(self.data_dir, split, manifest)
        self.num_tokens = int(sum(i.num_tokens for i in infos))
        if self.num_tokens == 0:
            raise GPTForgeError(f"{self.data_dir}: split {split!r} is empty (prepared with --val-tokens 0?)")
        self.num_windows = (self.num_tokens - 1) // seq_len
        G = world_size * batch_size
        self.short = allow_short and self.num_windows < G and self.num_tokens - 1 >= world_size
        if self.num_windows < G and not self.short:
            raise GPTForgeError(
                f"{self.data_dir}: split {split!r} has {self.num_tokens:,} tokens, fewer than one batch needs "
                f"({world_size} ranks x {batch_size} x {seq_len} + 1 = {G * seq_len + 1:,}); lower batch_size or seq_len, "
                "or prepare more data"
            )
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._infos = infos
        self._reader = _Reader(infos, seq_len)
        self._perm_cache: tuple | None = None  # (epoch, chunk, (ids, shard, local, fits))
        self.prefetch = prefetch
        self._prefetcher: _Prefetcher | None = None
        self._epoch = 0
        self._position = 0  # windows of this epoch handed out (all ranks)
        self.packing = packing
        self.bestfit: pk.BestFitStream | None = None
        if packing == "bestfit":
            starts = pk.document_starts([i.memmap() for i in infos], self.eot_id)
            shuffle = order == "shuffle"
            self.bestfit = pk.BestFitStream(starts, self.num_tokens, seq_len, self._permute_docs if shuffle else None,
                                         self._permute_rows if shuffle else None)
            self._position = (0, 0)  # (group, row in group) of this epoch's row stream

    # -- positions --------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    @property
    def steps_per_epoch(self) -> int:
        return self.num_windows // (self.world_size * self.B)

    def _shuffled(self, epoch: int, lo: int, n: int) -> tuple[np.ndarray, ...]:
        """Window ids at positions lo .. lo+n-1 of epoch's permutation, with their read plan;
        computed PERM_CHUNK positions at a time (vectorized), memory independent of the data size."""
        parts = []
        done = 0
        while done < n:
            chunk = (lo + done) // PERM_CHUNK
            if self._perm_cache is None or self._perm_cache[:2] != (epoch, chunk):
                a = chunk * PERM_CHUNK
                ids = Permutation(self.num_windows, self.seed, epoch)(np.arange(a, min(a + PERM_CHUNK, self.num_windows)))
                self._perm_cache = (epoch, chunk, (ids, *self._reader.plan(ids)))
            i = lo + done - chunk * PERM_CHUNK
            take = min(n - done, self._perm_cache[2][0].size - i)
            parts.append([arr[i : i + take] for arr in self._perm_cache[2]])
            done += take
        if len(parts) == 1:
            return tuple(parts[0])
        return tuple(np.concatenate(cols) for cols in zip(*parts))

    def _check_ids(self, reader: _Reader, tokens: np.ndarray, first_pos) -> None:
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            flat = np.flatnonzero(tokens.reshape(-1) >= self.vocab_size)[0]
            pos = first_pos(int(flat))
            path, local = reader.locate(pos)
            raise GPTForgeError(
                f"{path}: token id {int(tokens.reshape(-1)[flat])} at position {local} is >= the vocabulary size "
                f"{self.vocab_size} of its manifest.json (damaged shard? run gptforge prepare --verify {self.data_dir})"
            )

    def _batch_from_span(self, reader: _Reader, start_window: int):
        T, B = self.T, self.B
        span = reader.span(start_window * T, B * T + 1)
        self._check_ids(reader, span, lambda k: start_window * T + k)
        return self._to_device(span[:-1].reshape(B, T), span[1:].reshape(B, T))

    def _batch_from_windows(self, reader: _Reader, ids: np.ndarray, sid, local, fits):
        T = self.T
        rows = reader.windows(ids, sid, local, fits)  # (B, T+1)
        self._check_ids(reader, rows, lambda k: int(ids[k // (T + 1)]) * T + k % (T + 1))
        return self._to_device(rows[:, :-1], rows[:, 1:])

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        if self._pin:  # page-locked staging buffer: the copy to the GPU can overlap compute
            xy = torch.empty((2, B, T), dtype=torch.int64, pin_memory=True)
            a = xy.numpy()
        else:
            a = np.empty((2, B, T), dtype=np.int64)
            xy = torch.from_numpy(a)
        a[0] = x
        a[1] = y
        if self.device.type != "cpu":
            xy = xy.to(self.device, non_blocking=self._pin)
        return xy[0], xy[1]

    def _thread_init(self) -> None:
        """In the prefetch thread, first: the loader's GPU as the thread's current device (the
        current device is per thread), so that its pinned buffers and copies belong to that GPU
        rather than to GPU 0 (as torch's DataLoader does in its pin-memory thread)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _permute_docs(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        return Permutation(self.bestfit.num_docs, self.seed, epoch)(positions)

    def _permute_rows(self, epoch: int, group: int, n: int) -> np.ndarray:
        return Permutation(n, self.seed, epoch, salt=(group,))(np.arange(n))

    def _produce_rows(self, epoch: int, position: tuple[int, int]):
        """bestfit: this rank's B rows of the global batch at (epoch, position), and the position
        after the global batch."""
        group, row = position
        B, T = self.B, self.T
        mine, _ = self.bestfit.rows(epoch, group, row, skip=self.rank * B, take=B)
        _, (epoch, group, row) = self.bestfit.rows(epoch, group, row, skip=self.world_size * B, take=0)
        out = np.empty((B, T + 1), dtype=self._reader.dtype)
        where = []  # (row, column, split start, length) of each segment, to name a bad token
        for k, segments in enumerate(mine):
            col = 0
            for start, n in segments:
                self._reader.span_into(start, out[k, col : col + n])
                where.append((k, col, start, n))
                col += n
        self._check_ids(self._reader, out, lambda i: next(s + i % (T + 1) - c for k, c, s, n in where
                                                          if k == i // (T + 1) and c <= i % (T + 1) < c + n))
        x, y = self._to_device(out[:, :-1], out[:, 1:])
        return x, y, epoch, (group, row)

    def _produce(self, epoch: int, position: int):
        """The batch at (epoch, position) for this rank, and the position after it."""
        if self.bestfit is not None:
            return self._produce_rows(epoch, position)
        G = self.world_size * self.B
        if position + G > self.num_windows:
            epoch, position = epoch + 1, 0
        lo = position + self.rank * self.B
        if self.order == "sequential":
            x, y = self._batch_from_span(self._reader, lo)
        else:
            x, y = self._batch_from_windows(self._reader, *self._shuffled(epoch, lo, self.B))
        return x, y, epoch, position + G

    # -- public API -------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (B, T) on the device; y is x shifted by one token."""
        if self.short:
            raise GPTForgeError(f"{self.data_dir}: split {self.split!r} is shorter than one batch; it can be evaluated, not trained on")
        if self.prefetch:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._produce, self._epoch, self._position, self.prefetch,
                                               init=self._thread_init)
            x, y, epoch, position = self._prefetcher.get()
        else:
            x, y, epoch, position = self._produce(self._epoch, self._position)
        self._epoch, self._position = epoch, position
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def iter_epoch(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One sequential pass over the split from its start, this rank's share of each global
        batch, at most max_batches batches; the training position is left untouched."""
        reader = _Reader(self._infos, self.T)  # its own files: safe beside the prefetch thread
        if self.short:
            try:
                if max_batches is None or max_batches > 0:
                    yield self._short_batch(reader)
            finally:
                reader.close()
            return
        steps = self.steps_per_epoch if max_batches is None else min(self.steps_per_epoch, max_batches)
        G = self.world_size * self.B
        try:
            for step in range(steps):
                yield self._batch_from_span(reader, step * G + self.rank * self.B)
        finally:
            reader.close()

    def _short_batch(self, reader: _Reader) -> tuple[torch.Tensor, torch.Tensor]:
        """All of a split shorter than one global batch, as one batch per rank: this rank's share
        of the whole windows (fewer sequences than B; every rank the same number, so that FSDP's
        collective forwards stay in step), or with fewer whole windows than ranks, one shorter
        window per rank (the split's tokens cut in world_size equal parts)."""
        per_rank = self.num_windows // self.world_size
        if per_rank >= 1:
            b, t = per_rank, self.T
        else:
            b, t = 1, (self.num_tokens - 1) // self.world_size
        start = self.rank * b * t
        span = reader.span(start, b * t + 1)
        self._check_ids(reader, span, lambda k: start + k)
        x = torch.from_numpy(span[:-1].astype(np.int64).reshape(b, t))
        y = torch.from_numpy(span[1:].astype(np.int64).reshape(b, t))
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def state_dict(self) -> dict:
        """Plain ints and strings: safe for torch.save and torch.load(weights_only=True)."""
        state = {"version": STATE_VERSION, "split": self.split, "order": self.order, "seed": int(self.seed),
                 "epoch": int(self._epoch)}
        if self.bestfit is not None:
            state.update(packing=self.packing, group=int(self._position[0]), row=int(self._position[1]),
                         docs_per_group=int(self.bestfit.D), num_docs=int(self.bestfit.num_docs))
        else:
            state["position"] = int(self._position)
        state.update(num_windows=int(self.num_windows), num_tokens=int(self.num_tokens), seq_len=int(self.T))
        return state

    def load_state_dict(self, state: dict) -> None:
        where = "data loader state"
        if not isinstance(state, dict):
            raise GPTForgeError(f"{where}: expected a dict, got {type(state).__name__}")
        saved_packing = state.get("packing", "windows")  # a state without the field is of windows
        if saved_packing != self.packing:
            raise GPTForgeError(f"{where}: saved with data.packing {saved_packing!r}, this loader uses {self.packing!r}; "
                                "resume with the same data.packing")
        fields = ("group", "row", "docs_per_group", "num_docs") if self.bestfit is not None else ("position",)
        for key, tp in (("version", int), ("split", str), ("order", str), ("seed", int), ("epoch", int),
                        *((f, int) for f in fields), ("num_windows", int), ("num_tokens", int), ("seq_len", int)):
            if not isinstance(state.get(key), tp):
                raise GPTForgeError(f"{where}: field {key!r} missing or not {tp.__name__}")
        if state["version"] != STATE_VERSION:
            raise GPTForgeError(f"{where}: version {state['version']}, expected {STATE_VERSION}")
        saved = (state["split"], state["num_tokens"], state["seq_len"], state["num_windows"])
        mine = (self.split, self.num_tokens, self.T, self.num_windows)
        if saved != mine:
            raise GPTForgeError(
                f"{where}: saved for split {saved[0]!r} of {saved[1]:,} tokens with seq_len {saved[2]}, but this loader "
                f"reads split {mine[0]!r} of {mine[1]:,} tokens with seq_len {mine[2]}: resume with the same data and seq_len"
            )
        if state["order"] != self.order:
            raise GPTForgeError(f"{where}: saved with order {state['order']!r}, this loader uses {self.order!r}")
        if self.bestfit is not None:
            position = (state["group"], state["row"])
            if (state["docs_per_group"], state["num_docs"]) != (self.bestfit.D, self.bestfit.num_docs):
                raise GPTForgeError(f"{where}: saved for {state['num_docs']:,} documents in groups of {state['docs_per_group']}, "
                                    f"this split has {self.bestfit.num_docs:,} in groups of {self.bestfit.D}: resume with the same data")
            in_range = state["epoch"] >= 0 and 0 <= state["group"] < self.bestfit.num_groups and state["row"] >= 0
        else:
            position = state["position"]
            in_range = state["epoch"] >= 0 and 0 <= position <= self.num_windows
        if not in_range:
            raise GPTForgeError(f"{where}: position {position} / epoch {state['epoch']} out of range")
        self._stop_prefetch()
        self.seed = state["seed"]
        self._perm_cache = None
        if self.bestfit is not None:
            self.bestfit.forget()  # packed in the old seed's order
        self._epoch, self._position = state["epoch"], position

    def _stop_prefetch(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def close(self) -> None:
        self._stop_prefetch()
        self._reader.close()

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
