"""`gptforge tokenizer train SOURCE... --vocab-size N --out DIR`: train a byte-level BPE on your corpus."""

from __future__ import annotations

import argparse
import sys
import time

from gptforge.commands.options import add_source_options, count
from gptforge.errors import GPTForgeError

EPILOG = """\
sources: the same as `gptforge prepare` reads (files and directories, hf:NAME[:CONFIG],
python-stdlib), with the same policy for files that are not UTF-8 (skipped, or an error with
--strict). The tokenizer learns from at most --max-chars characters, a sample spread over the
whole corpus. DIR gets gptforge-tokenizer.json (what `prepare --tokenizer DIR` reads), the same
tokenizer for transformers (tokenizer.json, tokenizer_config.json, special_tokens_map.json) and
SHA256SUMS; it is written atomically. Then:

  gptforge prepare SOURCE... --tokenizer DIR --out DATA
  gptforge prepare SOURCE... --tokenizer train:8192 --out DATA     (both steps at once)
"""


def build_parser() -> argparse.ArgumentParser:
    from gptforge.data.tokenizer_sample import DEFAULT_MAX_CHARS
    from gptforge.tokenizer import DEFAULT_PATTERN, PATTERNS

    p = argparse.ArgumentParser(prog="gptforge tokenizer", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="train", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE", description=__doc__.splitlines()[0], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("sources", nargs="+", metavar="SOURCE", help="files, directories, hf:NAME[:CONFIG] or python-stdlib")
    t.add_argument("--vocab-size", type=count, required=True, metavar="N",
                   help="ids in all: 256 bytes + merges + <|endoftext|> (at least 257)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist unless --overwrite)")
    t.add_argument("--max-chars", type=count, default=DEFAULT_MAX_CHARS, metavar="N",
                   help=f"characters to learn from, spread over the corpus (default {DEFAULT_MAX_CHARS:_})")
    t.add_argument("--pattern", choices=list(PATTERNS), default=DEFAULT_PATTERN,
                   help=f"pre-tokenizer regex (default {DEFAULT_PATTERN}: see benchmarks/sweep_tokenizer.py)")
    add_source_options(t)
    t.add_argument("--overwrite", action="store_true", help="replace DIR if it holds a tokenizer")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from gptforge.data.tokenizer_sample import train_tokenizer

    if args.action != "train":  # pragma: no cover - argparse allows only train
        raise GPTForgeError(f"unknown action {args.action!r}")
    t0 = time.perf_counter()
    tok = train_tokenizer(args.sources, args.out, args.vocab_size, max_chars=args.max_chars, pattern=args.pattern,
                          text_field=args.text_field, split=args.split, strict=args.strict, overwrite=args.overwrite,
                          progress=not args.quiet)
    t = tok.meta["trained"]
    print(f"{args.out}: {tok.name}, {tok.vocab_size:,} ids (pattern {tok.pattern_name}), learned from "
          f"{t['chars']:,} characters of {t['documents']:,} documents ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return 0
