"""`gptforge prepare SOURCE... --out DIR`: tokenize text into shards; `--verify DIR` checks them."""

from __future__ import annotations

import argparse
import time

from gptforge.commands.options import add_source_options, count
from gptforge.errors import GPTForgeError

EPILOG = """\
sources (mixable): files and directories (.txt .md .jsonl .parquet .txt.gz .md.gz .jsonl.gz;
directories recursively, in sorted order), hf:NAME[:CONFIG] (a Hugging Face dataset, streamed),
python-stdlib (the .py files of this Python's standard library).

tokenizers: --tokenizer gpt2 (GPT-2's BPE, the default); DIR (a tokenizer made by `gptforge
tokenizer train`, or a prepared data directory whose tokenizer to reuse); train:N (train an N-id
byte-level BPE on these sources first, into OUT/tokenizer/). A trained tokenizer is stored with
the data; train, sample, eval and export take it from there. Over 65,536 ids, shards are uint32.

Re-running the same command after an interruption continues where it stopped; the result is
byte-identical to an uninterrupted run. The validation split is the first whole documents:
--val-tokens, or by default 0.5% of all tokens capped at 10M.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptforge prepare",
        description="Tokenize text into token shards (.npy) plus manifest.json.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="files, directories, hf:NAME[:CONFIG] or python-stdlib")
    p.add_argument("--out", metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", default="gpt2", metavar="T", help="gpt2 (default) | DIR | train:N (see below)")
    p.add_argument("--tokenizer-max-chars", type=count, default=None, metavar="N",
                   help="train:N: characters to learn from, spread over the corpus (default 2_000_000_000)")
    p.add_argument("--tokenizer-pattern", default=None, metavar="P", help="train:N: pre-tokenizer regex gpt2 | gpt4 | nanochat")
    p.add_argument("--workers", type=count, default=None, metavar="N", help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-tokens", type=count, default=None, metavar="N", help="tokens per shard (default 100_000_000)")
    p.add_argument("--val-tokens", type=count, default=None, metavar="N", help="validation tokens (default: 0.5%% of all, at most 10M)")
    add_source_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds, even if prepared otherwise")
    p.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest (sha256, ids) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.verify:
        if args.sources or args.out:
            raise GPTForgeError("--verify DIR takes no SOURCE and no --out")
        from gptforge.data.shards import verify

        t0 = time.perf_counter()
        report = verify(args.verify)
        print(f"{args.verify}: OK, {report['shards']} shards, {report['tokens']:,} tokens verified in {time.perf_counter() - t0:.1f}s")
        return 0
    if not args.sources:
        raise GPTForgeError("no SOURCE given (files, directories, hf:NAME[:CONFIG] or python-stdlib); see gptforge prepare --help")
    if not args.out:
        raise GPTForgeError("--out DIR is required")

    from gptforge.data.prepare import DEFAULT_SHARD_TOKENS, prepare, summary

    t0 = time.perf_counter()
    manifest = prepare(
        args.sources,
        args.out,
        shard_tokens=DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens,
        val_tokens=args.val_tokens,
        workers=args.workers,
        text_field=args.text_field,
        split=args.split,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=not args.quiet,
        tokenizer=args.tokenizer,
        tokenizer_max_chars=args.tokenizer_max_chars,
        tokenizer_pattern=args.tokenizer_pattern,
    )
    print(summary(args.out, manifest, time.perf_counter() - t0))
    return 0
