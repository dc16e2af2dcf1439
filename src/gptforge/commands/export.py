"""`gptforge export CKPT --to-hf OUT`: write a model as a Hugging Face GPT-2 directory
(config.json, model.safetensors, generation_config.json, tokenizer files) that
`transformers.GPT2LMHeadModel.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load offline."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptforge export", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint dir, run dir (newest checkpoint) or Hugging Face GPT-2 dir")
    p.add_argument("--to-hf", metavar="OUT", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str]) -> int:
    from gptforge.hf import export_hf, resolve_source

    a = build_parser().parse_args(argv)
    path = resolve_source(a.ckpt)
    out = export_hf(path, a.to_hf, overwrite=a.overwrite)
    print(f"gptforge export: {path} -> {out} (Hugging Face GPT-2)", file=sys.stderr)
    return 0
