"""The options several commands share, spelled one way everywhere.

Each has a short form and the config's dotted form, and every command that takes the option takes
both: `gptforge train --device cpu` is `--run.device cpu`, and `gptforge eval --run.device cpu`
is `--device cpu`. (train takes every config key dotted; the short forms are aliases of four.)
"""

from __future__ import annotations

import argparse

SHARED = {  # short flag -> dotted config key
    "device": "run.device",
    "precision": "run.precision",
    "seed": "run.seed",
    "preset": "model.preset",
}
HELP = {
    "device": "auto | cpu | cuda | cuda:N | mps (default auto)",
    "precision": "auto | fp32 | tf32 | bf16 | fp16 (default auto: bf16 on GPUs that have it; on a CPU the faster "
                 "of fp32 and bf16 by a cached matmul probe)",
    "seed": "random seed",
    "preset": "model preset: nano, mini, tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl",
}
VALUE_FLAGS = ("--config", "--resume")  # train's own flags that take a value


def expand_aliases(argv: list[str]) -> list[str]:
    """train's command line with `--device X` / `--device=X` (and the other short forms) rewritten
    to their dotted keys; values are never rewritten."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        takes_value = arg.startswith("--") and not eq
        if name.startswith("--") and name[2:] in SHARED:
            arg = f"--{SHARED[name[2:]]}" + (f"={value}" if eq else "")
        out.append(arg)
        if takes_value and (name in VALUE_FLAGS or name[2:] in SHARED or "." in name) and i + 1 < len(argv):
            out.append(argv[i + 1])  # the flag's value, whatever it looks like
            i += 1
        i += 1
    return out


def add_shared(parser: argparse.ArgumentParser, name: str, help: str | None = None, **kwargs) -> None:
    """`--NAME` and `--section.NAME` for one shared option of an argparse command."""
    parser.add_argument(f"--{name}", f"--{SHARED[name]}", dest=name, help=help or HELP[name], **kwargs)


def usage_note() -> str:
    return ("shared options, in either spelling: " + ", ".join(f"--{k} = --{v}" for k, v in SHARED.items()))


def count(text: str) -> int:
    """An argparse type: an integer, `_` allowed between digits (100_000_000)."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_source_options(p: argparse.ArgumentParser) -> None:
    """How sources are read, as `prepare` and `tokenizer train` both take it."""
    p.add_argument("--text-field", default="text", metavar="F", help="field of .jsonl / .parquet / hf records holding the text (default: text)")
    p.add_argument("--split", default="train", metavar="S", help="split of hf: datasets to read (default: train)")
    p.add_argument("--strict", action="store_true", help="an unreadable or non-UTF-8 file is an error (default: skipped)")
