#!/usr/bin/env python
"""The pre-tokenizer regex and the vocabulary size of trained tokenizers, by measurement.

For each (pattern, vocabulary size): a byte-level BPE trained on the embedded corpus's train
documents (all but the first ones, which are the val split's), then on the val documents: bytes per
token (compression) and, with --bpb-steps, the val bits per byte of a model trained with it. Also
GPT-2's BPE for comparison, and the training time and the raw encoding speed of each.

    python benchmarks/sweep_tokenizer.py                            # patterns gpt2, gpt4, nanochat at 4096
    python benchmarks/sweep_tokenizer.py --vocab 2048 4096 8192 --patterns gpt4
    python benchmarks/sweep_tokenizer.py --bpb-steps 150             # + a mini model per tokenizer (slow)

Compression and bpb do not depend on how busy the machine is; the times do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def val_documents(docs: list[str], val_chars: int) -> int:
    n = total = 0
    for d in docs:
        n += 1
        total += len(d)
        if total >= val_chars:
            break
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", nargs="*", default=["gpt2", "gpt4", "nanochat"])
    p.add_argument("--vocab", nargs="*", type=int, default=[4096])
    p.add_argument("--val-chars", type=int, default=150_000, help="the first documents, as the val split holds them")
    p.add_argument("--bpb-steps", type=int, default=0, help="also train a model per tokenizer for this many steps")
    p.add_argument("--model", default="mini")
    p.add_argument("--lr", default="2e-3")
    p.add_argument("--out", type=Path, default=Path("runs/sweep_tokenizer"))
    args = p.parse_args()

    from gptforge import tokenizer as tk
    from gptforge.data import sources

    docs = list(sources.iter_documents(sources.resolve_all([sources.STDLIB]), warn=lambda m: None))
    k = val_documents(docs, args.val_chars)
    val, train = docs[:k], docs[k:]
    val_bytes = sum(len(d.encode()) for d in val)
    print(f"train: {len(train):,} documents, {sum(map(len, train)) / 1e6:.1f}M chars; val: {k} documents, "
          f"{val_bytes:,} bytes; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    rows = []
    gpt2 = tk.Tokenizer()
    n = sum(len(t) for t in gpt2.encode_ordinary_batch(val, num_threads=2))
    rows.append(("gpt2 (GPT-2's BPE)", 50257, val_bytes / n, None, None, gpt2, None))
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab:
            for pattern in args.patterns:
                t0 = time.perf_counter()
                tok = tk.train_bpe(iter(train), vocab, pattern)
                train_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                n = sum(len(t) for t in tok.encode_ordinary_batch(train, num_threads=2))
                mbps = sum(len(d.encode()) for d in train) / (time.perf_counter() - t0) / 1e6
                n_val = sum(len(t) for t in tok.encode_ordinary_batch(val, num_threads=2))
                rows.append((f"{pattern}", vocab, val_bytes / n_val, train_s, mbps, tok, None))
                print(f"  {pattern} {vocab}: {val_bytes / n_val:.3f} bytes/token on val, trained in {train_s:.1f} s, "
                      f"encodes {mbps:.1f} MB/s", flush=True)
        if args.bpb_steps:
            rows = [r[:6] + (bpb_of(r[5], args, Path(tmp)),) for r in rows]
    print("\n| pattern | vocab | val bytes/token | train s | encode MB/s | val bpb" +
          (f" ({args.model}, {args.bpb_steps} steps, lr {args.lr})" if args.bpb_steps else "") + " |")
    print("|---|---|---|---|---|---|")
    for name, vocab, bpt, train_s, mbps, _, bpb in rows:
        print(f"| {name} | {vocab:,} | {bpt:.3f} | {'' if train_s is None else f'{train_s:.1f}'} | "
              f"{'' if mbps is None else f'{mbps:.1f}'} | {'' if bpb is None else f'{bpb:.3f}'} |")


def bpb_of(tok, args, tmp: Path) -> float:
    """Val bpb of a model trained for --bpb-steps on the embedded corpus prepared with `tok`."""
    from gptforge import config as C
    from gptforge.data.prepare import prepare
    from gptforge.training.trainer import train

    d = tmp / f"data-{tok.name}"
    if tok.trained:
        tok.save(tmp / f"tok-{tok.name}")
    prepare(["python-stdlib"], d, progress=False, tokenizer=str(tmp / f"tok-{tok.name}") if tok.trained else "gpt2")
    run = args.out / tok.name
    shutil.rmtree(run, ignore_errors=True)
    cfg = C.resolve(None, [("data.dir", str(d)), ("model.preset", args.model), ("optim.lr", args.lr),
                           ("run.max_steps", str(args.bpb_steps)), ("run.dir", str(run)), ("run.ckpt_every", "0"),
                           ("run.eval_every", "0"), ("data.verify", "false")])
    train(cfg, progress=False)
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_bpb" in r][-1]["val_bpb"]


if __name__ == "__main__":
    main()
