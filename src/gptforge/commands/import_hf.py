"""`gptforge import-hf SRC --out CKPT`: read a Hugging Face GPT-2 (a local directory, or a hub
name gpt2 ... gpt2-xl when online), or a Qwen3 / Llama directory the modern model computes (as
`export --to-hf` writes them), into a gptforge checkpoint directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptforge import-hf", description=__doc__.splitlines()[0])
    p.add_argument("src", metavar="SRC", help="Hugging Face GPT-2 / Qwen3 / Llama directory, or gpt2 | gpt2-medium | gpt2-large | gpt2-xl")
    p.add_argument("--out", metavar="CKPT", required=True, help="output checkpoint directory")
    p.add_argument("--pad-vocab", action="store_true", help="pad the vocabulary 50257 -> 50304 for faster matmuls")
    p.add_argument("--overwrite", action="store_true", help="replace CKPT if it exists")
    return p


def main(argv: list[str]) -> int:
    from gptforge.checkpoint import save_model
    from gptforge.interop.load import open_source

    a = build_parser().parse_args(argv)
    overrides = {"pad_vocab": True} if a.pad_vocab else {}
    source = open_source(a.src)
    model = source.load(**overrides)
    out = save_model(model, a.out, extra={"imported_from": str(a.src)}, overwrite=a.overwrite, tokenizer=source.tokenizer(),
                     inputs=[a.src] if Path(a.src).exists() else [])
    print(f"gptforge import-hf: {a.src} -> {out} ({model.num_params() / 1e6:.1f}M parameters)", file=sys.stderr)
    return 0
