"""`gptforge <command> ...`: find the command's module and hand it the rest of the arguments.

Each command lives in gptforge/commands/<name>.py with `main(argv) -> int`, which parses its own
flags and calls a typed library function. User errors (GPTForgeError) print one line and exit 1.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "tokenizer": ("tokenizer", "train a byte-level BPE tokenizer on your corpus"),
    "prepare": ("prepare", "tokenize text into token shards (GPT-2's BPE or a trained one)"),
    "train": ("train", "train a GPT (no arguments: the default model on the embedded corpus, then a sample)"),
    "sample": ("sample", "generate text from a checkpoint"),
    "eval": ("evaluate", "validation loss / perplexity, HellaSwag, downstream tasks (--tasks)"),
    "bench": ("bench", "the precision / attention / compile speed ladder"),
    "plot": ("plot", "loss and perplexity curves of one or more runs"),
    "export": ("export", "write a checkpoint as a Hugging Face directory (GPT-2, or Qwen3 / Llama)"),
    "import-hf": ("import_hf", "read a Hugging Face GPT-2 into a gptforge checkpoint"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items())
    return f"usage: gptforge <command> [options]\n\ncommands:\n{rows}\n\n'gptforge <command> --help' for a command's options."


def main(argv: list[str] | None = None) -> int:
    from gptforge.errors import GPTForgeError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from gptforge import __version__

        print(f"gptforge {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gptforge: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"gptforge.commands.{COMMANDS[name][0]}")
    try:
        return int(module.main(rest) or 0)
    except GPTForgeError as e:
        print(f"gptforge {name}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine failed us (a full disk, a permission): one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"gptforge {name}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gptforge {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
