"""`gptforge export CKPT --to-hf OUT`: write a model as a Hugging Face directory (config.json,
model.safetensors, generation_config.json, tokenizer files) that transformers' `AutoModelForCausalLM`
and `AutoTokenizer` load offline: GPT-2 as GPT2LMHeadModel, the modern model as Qwen3ForCausalLM
(LlamaForCausalLM without QK-norm); any other model as gptforge's own modeling file, which
transformers loads with trust_remote_code=True (gptforge.interop.remote)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptforge export", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint dir, run dir (newest checkpoint) or Hugging Face GPT-2 / Qwen3 / Llama / gptforge-export dir")
    p.add_argument("--to-hf", metavar="OUT", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str]) -> int:
    import json

    from gptforge.interop.export import export_hf
    from gptforge.interop.load import resolve_source

    a = build_parser().parse_args(argv)
    path = resolve_source(a.ckpt)
    out = export_hf(path, a.to_hf, overwrite=a.overwrite, inputs=[a.ckpt])
    meta = json.loads((out / "config.json").read_text())
    kind = meta["architectures"][0] + (", its own modeling file: load with trust_remote_code=True" if "auto_map" in meta else "")
    print(f"gptforge export: {path} -> {out} (Hugging Face {kind})", file=sys.stderr)
    return 0
