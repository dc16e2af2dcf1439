"""gptforge train [--config FILE|NAME] [--resume DIR|auto] [--section.key VALUE ...]"""

from __future__ import annotations

import sys

from gptforge import config as C
from gptforge.commands.options import expand_aliases, usage_note
from gptforge.errors import GPTForgeError
from gptforge.training.checkpoint import checkpoint_meta, resolve_resume
from gptforge.training.distributed import DistEnv
from gptforge.training.rundir import resume_run_dir
from gptforge.training.trainer import train

USAGE = """usage: gptforge train [--config FILE|NAME] [--resume DIR|auto] [--section.key VALUE ...]

Train a GPT. With no arguments: the default model (configs/default.toml) on the embedded python-stdlib corpus
(prepared on first use), on the CPU or GPU, then a sample. Defaults -> --config TOML ->
overrides, in that order. --resume auto continues from the newest complete checkpoint in
run.dir (and starts fresh if there is none); --resume DIR takes a checkpoint or run directory.
On resume the checkpoint's saved config is the base, and --config / overrides apply on top.

options:
"""


EXIT_CODES = {"interrupted": 130, "terminated": 143}  # 128 + SIGINT / SIGTERM, as the shell reports them


def split_args(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    config_file = resume = None
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--config", "--resume"):
            if arg == flag or arg.startswith(flag + "="):
                if "=" in arg:
                    value, i = arg.split("=", 1)[1], i + 1
                elif i + 1 < len(argv):
                    value, i = argv[i + 1], i + 2
                else:
                    raise GPTForgeError(f"{flag} needs a value")
                if flag == "--config":
                    config_file = value
                else:
                    resume = value
                break
        else:
            rest.append(arg)
            i += 1
    return config_file, resume, rest


def build_config(argv: list[str]) -> tuple[C.TrainConfig, str | None]:
    """The resolved config and the resume request, from the command line."""
    config_file, resume, rest = split_args(expand_aliases(argv))
    overrides = C.parse_overrides(rest)
    cfg = C.resolve(config_file, overrides)
    if resume:
        found = resolve_resume(resume, cfg.run.dir)
        if found is not None:  # the checkpoint's config is the base; file and flags on top
            _, saved = checkpoint_meta(found)
            base = C.TrainConfig.from_dict(saved, where=str(found / "config.json"))
            if config_file:
                C.apply_dict(base, C.load_toml(config_file), config_file)
            for key, value in overrides:
                C.set_value(base, key, value, f"--{key}")
            # the run dir given, else the checkpoint's own on disk: never the one recorded in it
            base.run.dir = resume_run_dir(found, base.run.dir if "run.dir" in base.explicit else None)
            base.run.overwrite = "run.overwrite" in base.explicit and base.run.overwrite
            cfg = base.validate()
            resume = str(found)
        else:
            resume = None  # auto with nothing to resume: a fresh run
    return cfg, resume


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE + "  --config FILE   TOML file with [model] [data] [optim] [run] tables, or a packaged one by name\n"
              f"                  from any directory: {', '.join(sorted(C.packaged_configs()))}\n"
              "  --resume R      auto | checkpoint dir | run dir\n"
              f"  {usage_note()}\n\n" + C.describe())
        return 0
    cfg, resume = build_config(argv)
    result = train(cfg, resume=resume)
    if result.sample:
        print("\n--- sample ---\n" + result.sample + "\n--------------", flush=True)
    if result.val_loss is not None and DistEnv.from_env().is_main:  # under torchrun, rank 0 speaks
        print(f"final val loss {result.val_loss:.4f} after {result.step} steps; checkpoint {result.last_checkpoint}")
    return EXIT_CODES.get(result.stopped, 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
