"""data.packing on a prepared directory: the document scan, tokens in rows, and batches/s.

    python benchmarks/bench_packing.py DIR                  # e.g. the embedded corpus's cache dir
    python benchmarks/bench_packing.py DIR --seq-lens 256 --batches 1500

For each T: bestfit's rows per epoch and share of the split's tokens in rows, windows', and
nanochat's rule replayed on the same document lengths (largest document that fits, else crop the
shortest and drop its rest; a buffer of 1,000 documents, in the split's order). Then B=32 batches/s
of each packing and order, in alternating rounds so both see the same machine load.
"""

from __future__ import annotations

import argparse
import bisect
import time

import numpy as np

from gptforge.data import packing as pk
from gptforge.data import shards
from gptforge.data.loader import ShardLoader


def nanochat_rows(lengths: list[int], seq_len: int, buffer: int = 1000) -> tuple[int, int]:
    """(rows, tokens in rows) of nanochat's BOS-aligned best fit, which drops what it crops."""
    width, buf, nxt, rows = seq_len + 1, [], 0, 0
    while True:
        while len(buf) < buffer and nxt < len(lengths):
            bisect.insort(buf, lengths[nxt])
            nxt += 1
        space = width
        while space and buf:
            j = bisect.bisect_right(buf, space) - 1
            space = space - buf.pop(j) if j >= 0 else (buf.pop(0), 0)[1]
        if space:
            return rows, rows * width
        rows += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--batches", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    manifest = shards.read_manifest(args.data_dir)
    infos = shards.open_split(args.data_dir, "train", manifest)
    num_tokens = sum(i.num_tokens for i in infos)
    scans = []
    for _ in range(3):
        t = time.perf_counter()
        starts = pk.document_starts([i.memmap() for i in infos], manifest["eot_id"])
        scans.append(time.perf_counter() - t)
    print(f"scan: {len(starts):,} documents in {num_tokens:,} tokens, {min(scans) * 1e3:.1f}-{max(scans) * 1e3:.1f} ms "
          f"({min(scans) / num_tokens * 1e9:.1f} ns a token)")
    lengths = np.diff(np.append(starts, num_tokens)).tolist()
    for T in args.seq_lens:
        for order in ("sequential", "shuffle"):
            with ShardLoader(args.data_dir, batch_size=1, seq_len=T, order=order, packing="bestfit") as ld:
                print(f"T={T} {order}: {ld.bestfit.stats().line()} (D={ld.bestfit.D}); windows {ld.num_windows:,} "
                      f"({ld.num_windows * T / num_tokens:.2%})")
        rows, used = nanochat_rows(lengths, T)
        print(f"T={T} nanochat's rule: {rows:,} rows, {used / num_tokens:.1%} of the tokens in rows")
    for _ in range(args.rounds):
        for packing in ("windows", "bestfit"):
            for order in ("shuffle", "sequential"):
                with ShardLoader(args.data_dir, batch_size=32, seq_len=args.seq_lens[0], order=order, packing=packing) as ld:
                    for _ in range(50):
                        ld.next_batch()
                    t = time.perf_counter()
                    for _ in range(args.batches):
                        ld.next_batch()
                    rate = args.batches / (time.perf_counter() - t)
                print(f"{packing:8s} {order:10s} {rate:8,.0f} batches/s (B=32, T={args.seq_lens[0]})", flush=True)


if __name__ == "__main__":
    main()
