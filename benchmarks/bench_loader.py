"""ShardLoader vs the per-item design, side by side on the same shards; and resident memory.

The per-item design (the seed's): a torch Dataset whose __getitem__ returns one (T+1)-token chunk
of the memory-mapped shards, located by bisect over cumulative counts, batched by a DataLoader
with shuffle=True. Ours: vectorized gathers from the memory maps (gptforge.data.loader).

    python benchmarks/bench_loader.py                       # 2G tokens of random shards (4 GB)
    python benchmarks/bench_loader.py --tokens 500_000_000  # a smaller machine

The shards (random uint16 ids, like GPT-2's) are generated once into --dir and reused. Throughput
is measured in alternating rounds (ours, per-item, ours, ...) so both see the same machine load;
the median of each is reported. Then each loader streams through --stream-tokens tokens while
psutil samples the process's resident set size (RSS): the growth over the post-warm-up value.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from gptforge.data import shards
from gptforge.data.loader import ShardLoader

VOCAB, EOT = 50257, 50256


def make_shards(data_dir: Path, tokens: int, shard_tokens: int) -> None:
    manifest = data_dir / shards.MANIFEST
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if m.get("bench") == {"tokens": tokens, "shard_tokens": shard_tokens}:
            return
    print(f"writing {tokens:,} random tokens into {data_dir} ...", flush=True)
    t0 = time.perf_counter()

    def arrays(total, seed):
        rng = np.random.default_rng(seed)
        for start in range(0, total, shard_tokens):
            yield rng.integers(0, VOCAB, size=min(shard_tokens, total - start), dtype=np.uint16)

    val = min(tokens // 100, 10_000_000)
    shards.write_dataset(
        data_dir, {"val": arrays(val, 1), "train": arrays(tokens - val, 2)}, vocab_size=VOCAB, eot_id=EOT,
        tokenizer="gpt2", extra={"bench": {"tokens": tokens, "shard_tokens": shard_tokens}},
    )
    print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)


class PerItemDataset(torch.utils.data.Dataset):
    """The per-item design: one window per __getitem__, located by bisect, stitched at boundaries."""

    def __init__(self, data_dir: Path, split: str, seq_len: int):
        m = shards.read_manifest(data_dir)
        self.shards = [np.load(data_dir / e["file"], mmap_mode="r") for e in m["splits"][split]["shards"]]
        self.cum = [0]
        for s in self.shards:
            self.cum.append(self.cum[-1] + len(s))
        self.T = seq_len

    def __len__(self) -> int:
        return (self.cum[-1] - 1) // self.T

    def __getitem__(self, i: int):
        start = i * self.T
        s = bisect.bisect_right(self.cum, start) - 1
        local = start - self.cum[s]
        chunk = self.shards[s][local : local + self.T + 1]
        if len(chunk) < self.T + 1:
            chunk = np.concatenate([chunk, self.shards[s + 1][: self.T + 1 - len(chunk)]])
        chunk = torch.from_numpy(chunk.astype(np.int64))
        return chunk[:-1], chunk[1:]


def per_item_batches(data_dir, B, T, workers, seed):
    g = torch.Generator().manual_seed(seed)
    dl = torch.utils.data.DataLoader(
        PerItemDataset(data_dir, "train", T), batch_size=B, shuffle=True, drop_last=True, num_workers=workers, generator=g,
        persistent_workers=workers > 0,
    )
    while True:
        yield from dl


def ours_batches(data_dir, B, T, order, prefetch, seed):
    loader = ShardLoader(data_dir, "train", batch_size=B, seq_len=T, order=order, seed=seed, prefetch=prefetch)
    while True:
        yield loader.next_batch()


def rate(batches, seconds: float, warmup: int = 50) -> float:
    for _ in range(warmup):
        next(batches)
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        for _ in range(16):
            next(batches)
        n += 16
    return n / dt


def rss_growth(batches, tokens_per_batch: int, stream_tokens: int, max_seconds: float) -> tuple[float, float, int]:
    """(MB of RSS growth over the post-warm-up value, peak RSS MB, tokens streamed)."""
    proc = psutil.Process()
    for _ in range(50):
        next(batches)
    base = peak = proc.memory_info().rss
    done, t0, i = 0, time.perf_counter(), 0
    while done < stream_tokens and time.perf_counter() - t0 < max_seconds:
        next(batches)
        done += tokens_per_batch
        i += 1
        if i % 64 == 0:
            peak = max(peak, proc.memory_info().rss)
    peak = max(peak, proc.memory_info().rss)
    return (peak - base) / 1e6, peak / 1e6, done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=lambda s: int(s.replace("_", "")), default=2_000_000_000, help="tokens of random shards")
    p.add_argument("--shard-tokens", type=lambda s: int(s.replace("_", "")), default=100_000_000)
    p.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "gptforge-bench-loader"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=3.0, help="per throughput round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-item-workers", type=int, default=0, help="DataLoader num_workers of the per-item design")
    p.add_argument("--stream-tokens", type=lambda s: int(s.replace("_", "")), default=2_000_000_000,
                   help="tokens streamed while measuring RSS (at most the data size per pass; epochs repeat)")
    p.add_argument("--stream-seconds", type=float, default=120.0, help="time cap of each RSS stream")
    args = p.parse_args()

    data_dir = Path(args.dir)
    make_shards(data_dir, args.tokens, args.shard_tokens)
    B, T = args.batch_size, args.seq_len
    print(f"data: {args.tokens:,} tokens in {-(-args.tokens // args.shard_tokens)} train/val shards; B={B}, T={T}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")

    contenders = {
        "ours shuffle": lambda: ours_batches(data_dir, B, T, "shuffle", 0, 0),
        "ours sequential": lambda: ours_batches(data_dir, B, T, "sequential", 0, 0),
        f"per-item DataLoader(shuffle, workers={args.per_item_workers})": lambda: per_item_batches(data_dir, B, T, args.per_item_workers, 0),
    }
    gens = {name: make() for name, make in contenders.items()}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, gen in gens.items():
            rates[name].append(rate(gen, args.seconds))
        print(f"  round {r + 1}: " + ", ".join(f"{n}: {v[-1]:,.0f}" for n, v in rates.items()), flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    base = med[list(med)[-1]]
    print("\nthroughput (median of rounds)")
    for name, v in med.items():
        print(f"  {name:<44} {v:>10,.0f} batches/s {v * B * T / 1e6:>9,.1f} M tokens/s   {v / base:6.1f}x per-item")
    del gens, gen  # the per-item design's memory maps: unmapped before measuring memory
    gc.collect()

    print(f"\nresident memory while streaming up to {args.stream_tokens:,} tokens ({args.stream_tokens * 2 / 1e9:.1f} GB of uint16)")
    for name in ("ours sequential", "ours shuffle", list(contenders)[-1]):
        growth, peak, done = rss_growth(contenders[name](), B * T, args.stream_tokens, args.stream_seconds)
        print(f"  {name:<44} streamed {done / 1e9:5.2f}G tokens: RSS growth {growth:7.1f} MB (peak {peak:,.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
