"""`prepare` throughput vs the limit: raw tiktoken encode_ordinary_batch of the same text on all cores.

    python benchmarks/bench_prepare.py                         # the python-stdlib corpus
    python benchmarks/bench_prepare.py data/ --text-field text # any sources prepare accepts
    python benchmarks/bench_prepare.py --tokenizer DIR         # prepare with a trained tokenizer

The limit is always GPT-2's raw tiktoken encoding; with --tokenizer DIR (a trained tokenizer) the
raw encoding with that tokenizer is measured too. A tokenizer that compresses better writes fewer
tokens for the same text, so tokens/s and MB/s are both printed, and the ratios of each.

The limit is tokenization alone, on texts already in memory, with tiktoken's own thread pool over
all cores. `prepare` is the whole command: reading the files, tokenizing in worker processes,
writing parts and shards (fsync'd) and the manifest. Rounds alternate (limit, prepare, limit, ...)
so both see the same machine load; the best round of each is reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from gptforge.data import prepare as prep
from gptforge.data import sources
from gptforge.tokenizer import get_encoding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", default=["python-stdlib"])
    p.add_argument("--text-field", default="text")
    p.add_argument("--workers", type=int, default=prep.default_workers())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 or a trained tokenizer's directory")
    args = p.parse_args()

    srcs = sources.resolve_all(args.sources)
    texts = list(sources.iter_documents(srcs, text_field=args.text_field, warn=lambda m: None))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    enc = get_encoding()
    from gptforge.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    print(f"{len(texts):,} documents, {n_bytes / 1e6:.1f} MB of UTF-8 text; {args.workers} workers / threads, "
          f"{os.cpu_count()} CPUs")

    limit, ours, raw, tokens, gpt2_tokens = [], [], [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            t0 = time.perf_counter()
            toks = enc.encode_ordinary_batch(texts, num_threads=args.workers)
            limit.append(time.perf_counter() - t0)
            gpt2_tokens = tokens = sum(len(t) for t in toks) + len(texts)  # + one EOT per document, as prepare writes
            del toks
            if tok.trained:
                t0 = time.perf_counter()
                toks = tok.enc.encode_ordinary_batch(texts, num_threads=args.workers)
                raw.append(time.perf_counter() - t0)
                tokens = sum(len(t) for t in toks) + len(texts)
                del toks
            out = os.path.join(tmp, "out")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            m = prep.prepare(args.sources, out, workers=args.workers, text_field=args.text_field, progress=False,
                             tokenizer=args.tokenizer)
            ours.append(time.perf_counter() - t0)
            written = m["splits"]["train"]["num_tokens"] + m["splits"]["val"]["num_tokens"]
            assert written == tokens, (written, tokens)
            print(f"  round {r + 1}: limit {gpt2_tokens / limit[-1] / 1e6:.2f} M tok/s, prepare {tokens / ours[-1] / 1e6:.2f} M tok/s", flush=True)

    best_limit, best_ours = min(limit), min(ours)
    print(f"\n{gpt2_tokens:,} GPT-2 tokens" + (f", {tokens:,} {tok.name} tokens" if tok.trained else ""))
    print(f"  limit: GPT-2 encode_ordinary_batch   {gpt2_tokens / best_limit / 1e6:7.2f} M tokens/s  {n_bytes / best_limit / 1e6:7.1f} MB/s")
    if raw:
        print(f"  {tok.name} encode_ordinary_batch {tokens / min(raw) / 1e6:7.2f} M tokens/s  {n_bytes / min(raw) / 1e6:7.1f} MB/s")
    print(f"  gptforge prepare, {tok.name} (end to end) {tokens / best_ours / 1e6:7.2f} M tokens/s  {n_bytes / best_ours / 1e6:7.1f} MB/s")
    print(f"  ratio to the limit: {(tokens / best_ours) / (gpt2_tokens / best_limit):.2f}x in tokens/s, "
          f"{best_limit / best_ours:.2f}x in MB/s (goal >= 0.8x)")


if __name__ == "__main__":
    main()
