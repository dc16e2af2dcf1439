"""Best-fit packing (data.packing bestfit): rows that start on documents, with no token lost.

A document is the tokens from one EOT up to (not including) the next (shards put an EOT before
each document, so it acts as BOS); tokens before the split's first EOT are a document too. A row
holds T+1 tokens, x = row[:-1] and y = row[1:], and is a concatenation of document segments:

1. The documents of an epoch are taken in order: for `shuffle` a seeded permutation of the
   documents per epoch (the loader's Feistel `Permutation` with (seed, epoch)), for `sequential`
   their order in the split.
2. A segment is a run of one document's tokens. A segment that begins a document (its EOT) may
   sit anywhere in a row; one that continues a document ("a continuation") only at a row's start,
   beginning with the last token of that document's previous segment, so that every token after a
   document's first is a target exactly once (a document longer than a row is cut into pieces
   doc[kT : kT + T + 1] overlapping by one token).
3. Documents are packed in groups of D consecutive documents of the epoch's order, D fixed at
   construction so that a group averages >= 256 rows (D = max(1, ceil(256 T / mean document
   length))). A group is packed alone and deterministically (`pack_group`): a row starts with the
   pending continuation if there is one, else with the longest unplaced document; while space
   remains, the longest unplaced document that fits whole is appended; when none fits, the
   shortest one is cut to fill the row exactly and its rest becomes the pending continuation
   (so no token is dropped, and at most one document of the group is ever half placed). Ties go
   to the earlier document. A group's last row, if not full, is dropped (its tokens are counted
   as dropped), as are documents of one token (an EOT followed by an EOT: no target).
   Why the continuation first: starting each row with the longest piece instead, every piece of
   T+1 tokens (documents' first pieces included) takes a row alone, and the documents' shorter
   last pieces are left with nothing to fill their rows: about one unfilled row per document of
   the group, 1.8% of the tokens at T=256 on the embedded corpus against 0.19% here.
4. With `shuffle`, a group's rows are handed out in a seeded order of their own (a permutation
   per (seed, epoch, group)): packed in order, the rows of a long document follow each other, and
   a batch of consecutive rows would be one document's consecutive stretch (on the embedded
   corpus, ~21 rows a document, that cost 0.34 val bpb at 200 steps: docs/performance.md).
5. The row stream of an epoch is the rows of group 0, group 1, ...; then the next epoch. A
   global batch is world_size * B consecutive rows of the stream (it may cross groups and
   epochs); rank r takes rows [rB, rB + B). The stream does not depend on B or world_size.

nanochat packs rows the same way (best fit, BOS-aligned) but crops the document that fills a row
and drops the rest: on corpora of long documents that drops most tokens. Here the rest goes back
as the continuation that starts the next row; the cost is one repeated token per row that starts
with a continuation (it is x there, a target in the row before), and one partial row per group.

Memory and cost: the document starts are found once, when the loader is built, by scanning every
token of the split for EOT (np.flatnonzero on each shard's memory map, in blocks): one sequential
read of the split (5-25 ms for the 9.3M-token embedded corpus from the page cache, 0.6-2.5 ns a
token; a 10B-token split reads its 20 GB once: seconds from the page cache, minutes from a disk)
and 8 bytes kept per document (int64 starts). Packing a group is arithmetic on (offset, length)
pairs of its D documents, done when the stream reaches it (~4 us a row with documents of ~300
tokens and T=1024, ~40 us with documents of ~60 tokens and T=2048); tokens are read only for
this rank's rows.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from gptforge.errors import GPTForgeError

PACKINGS = ("windows", "bestfit")
GROUP_ROWS = 256  # rows a group of documents averages, at least: room to fit whole documents
STATS_DOCS = 200_000  # documents packed to report utilization (~1 s at most); a larger split is sampled
_SCAN_BLOCK = 1 << 24  # tokens compared at a time while indexing: bounded memory for any shard size


def document_starts(shard_arrays: Sequence[np.ndarray], eot_id: int) -> np.ndarray:
    """int64 starts (positions in the split) of its documents: each EOT, and 0 if the split does
    not begin with one (tokens before the first EOT are a document too)."""
    found, base = [np.zeros(1, dtype=np.int64)], 0
    for arr in shard_arrays:
        for lo in range(0, arr.size, _SCAN_BLOCK):
            hits = np.flatnonzero(arr[lo : lo + _SCAN_BLOCK] == eot_id)
            if hits.size:
                found.append(hits.astype(np.int64) + (base + lo))
        base += arr.size
    starts = np.concatenate(found)
    return starts[1:] if starts.size > 1 and starts[1] == 0 else starts


def docs_per_group(num_tokens: int, num_docs: int, seq_len: int) -> int:
    """D: documents per group so that a group averages >= GROUP_ROWS rows of seq_len + 1 tokens."""
    return max(1, math.ceil(GROUP_ROWS * seq_len * num_docs / max(1, num_tokens)))


@dataclass(frozen=True)
class PackedGroup:
    """The rows of one group: row r is segments row_first[r] .. row_first[r + 1] - 1, segment s
    being tokens [offset[s], offset[s] + length[s]) of the group's document doc[s]."""

    row_first: list[int]
    doc: list[int]
    offset: list[int]
    length: list[int]
    dropped: int  # tokens of the group in no row: its unfinished last row, one-token documents

    @property
    def rows(self) -> int:
        return len(self.row_first) - 1

    def segments(self, r: int) -> list[tuple[int, int, int]]:
        """Row r as (document, offset, length) segments."""
        a, b = self.row_first[r], self.row_first[r + 1]
        return list(zip(self.doc[a:b], self.offset[a:b], self.length[a:b]))


def pack_group(lengths: Sequence[int], seq_len: int) -> PackedGroup:
    """Rows of exactly seq_len + 1 tokens from documents of these lengths (indices into
    `lengths`), by the rule of the module doc; a pure function of its arguments."""
    width, m = seq_len + 1, max(1, len(lengths))
    # unplaced documents as sorted keys length * m + document: ints bisect fast; ties by document
    unplaced = sorted(n * m + d for d, n in enumerate(lengths) if n >= 2)
    dropped = sum(n for n in lengths if n < 2)
    row_first, docs, offsets, sizes = [0], [], [], []
    pending: tuple[int, int] | None = None  # the continuation: (document, offset)
    while unplaced or pending is not None:
        if pending is not None:
            d, off = pending
            pending = None
        else:  # the longest, earliest among equals
            d = unplaced.pop(bisect.bisect_left(unplaced, unplaced[-1] // m * m)) % m
            off = 0
        take = min(lengths[d] - off, width)
        docs.append(d), offsets.append(off), sizes.append(take)
        first_repeats = off > 0  # a continuation's first token was the last of its previous segment
        if take < lengths[d] - off:
            pending = (d, off + take - 1)
        space = width - take
        while space and unplaced:
            j = bisect.bisect_right(unplaced, space * m + m - 1) - 1
            if j >= 0:  # the longest that fits whole
                key = unplaced.pop(bisect.bisect_left(unplaced, unplaced[j] // m * m))
                n, d = divmod(key, m)
                docs.append(d), offsets.append(0), sizes.append(n)
                space -= n
            else:  # none fits: the shortest is cut to fill the row, its rest continues next row
                d = unplaced.pop(0) % m
                docs.append(d), offsets.append(0), sizes.append(space)
                pending = (d, space - 1)
                space = 0
        if space:  # nothing left to fill it: the group's last row, dropped
            dropped += width - space - first_repeats
            first = row_first[-1]
            del docs[first:], offsets[first:], sizes[first:]
            break
        row_first.append(len(docs))
    return PackedGroup(row_first, docs, offsets, sizes, dropped)


@dataclass(frozen=True)
class PackingStats:
    rows: int  # rows per epoch
    tokens: int  # tokens of the split in those rows, each counted once
    num_tokens: int  # tokens of the split
    estimated: bool  # from a sample of the groups (a split of more than STATS_DOCS documents)

    @property
    def utilization(self) -> float:
        return self.tokens / self.num_tokens

    def line(self) -> str:
        about = "~" if self.estimated else ""
        return f"bestfit packing: {about}{self.rows:,} rows per epoch, {about}{self.utilization:.2%} of the tokens in rows"


class BestFitStream:
    """The row stream of one split (module doc): positions are (epoch, group, row in group)."""

    CACHE = 4  # packed groups kept (this rank's batch and the next usually need one or two)

    def __init__(self, starts: np.ndarray, num_tokens: int, seq_len: int,
                 permute: Callable[[int, np.ndarray], np.ndarray] | None,
                 permute_rows: Callable[[int, int, int], np.ndarray] | None = None):
        """permute(epoch, positions) -> documents at those positions of the epoch's order
        (None: the split's order); permute_rows(epoch, group, n) -> the order in which the
        group's n packed rows are handed out (None: as packed)."""
        self.permute_rows = permute_rows
        self.starts = starts
        self.lengths = np.diff(np.append(starts, num_tokens))
        self.num_tokens, self.T, self.permute = num_tokens, seq_len, permute
        self.num_docs = int(starts.size)
        self.D = docs_per_group(num_tokens, self.num_docs, seq_len)
        self.num_groups = -(-self.num_docs // self.D)
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, PackedGroup, np.ndarray | None]] = OrderedDict()

    def group_docs(self, epoch: int, g: int) -> np.ndarray:
        """The documents of group g of the epoch, in their order."""
        pos = np.arange(g * self.D, min((g + 1) * self.D, self.num_docs), dtype=np.int64)
        return pos if self.permute is None else self.permute(epoch, pos)

    def forget(self) -> None:
        """Drop the packed groups kept (the order changed: a new seed)."""
        self._cache.clear()

    def group(self, epoch: int, g: int) -> tuple[np.ndarray, PackedGroup, np.ndarray | None]:
        """The group's documents, its packing and the order of its rows (None: as packed)."""
        key = (epoch, g)
        hit = self._cache.get(key)
        if hit is None:
            docs = self.group_docs(epoch, g)
            packed = pack_group(self.lengths[docs].tolist(), self.T)
            order = self.permute_rows(epoch, g, packed.rows) if self.permute_rows and packed.rows else None
            hit = (docs, packed, order)
            self._cache[key] = hit
            if len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return hit

    def rows(self, epoch: int, g: int, r: int, skip: int, take: int):
        """From position (epoch, g, r): skip `skip` rows, then the next `take` rows as lists of
        (split start, length) segments; and the position after them."""
        out: list[list[tuple[int, int]]] = []
        empty = 0  # groups passed in a row without a row: a split with none would never end
        while skip or len(out) < take:
            if g >= self.num_groups:
                epoch, g, r = epoch + 1, 0, 0
            docs, packed, order = self.group(epoch, g)
            empty = empty + 1 if packed.rows == 0 else 0
            if empty > self.num_groups:
                raise GPTForgeError(f"data loader: no group of documents fills one row of {self.T + 1} tokens "
                                    "(data.packing bestfit); lower seq_len or use data.packing windows")
            n = min(skip, max(0, packed.rows - r))
            skip, r = skip - n, r + n
            while not skip and r < packed.rows and len(out) < take:
                row = r if order is None else int(order[r])
                out.append([(int(self.starts[docs[d]]) + off, k) for d, off, k in packed.segments(row)])
                r += 1
            if r >= packed.rows:
                g, r = g + 1, 0
        if g >= self.num_groups:
            epoch, g = epoch + 1, 0
        return out, (epoch, g, r)

    def stats(self, epoch: int = 0) -> PackingStats:
        """Rows and tokens in rows of the epoch; a split of more than STATS_DOCS documents is
        estimated from groups of STATS_DOCS documents in all, spread evenly over it, scaled by tokens."""
        k = min(self.num_groups, max(1, STATS_DOCS // self.D))
        picked = sorted({g * self.num_groups // k for g in range(k)})
        rows = tokens = seen = 0
        for g in picked:
            docs = self.group_docs(epoch, g)
            lengths = self.lengths[docs]
            packed = pack_group(lengths.tolist(), self.T)
            group_tokens = int(lengths.sum())
            rows += packed.rows
            tokens += group_tokens - packed.dropped
            seen += group_tokens
        if seen == self.num_tokens:
            return PackingStats(rows, tokens, self.num_tokens, False)
        scale = self.num_tokens / max(1, seen)
        return PackingStats(round(rows * scale), round(tokens * scale), self.num_tokens, True)
