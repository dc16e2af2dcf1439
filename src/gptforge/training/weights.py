"""Where a run's weights come from, decided in one place: random init, `--resume` (the weights of
a training checkpoint; its optimizer and position are restored by the trainer), or
`model.init_from` (weights only, a fresh run at step 0).

`model.init_from` takes anything `GPT.from_pretrained` reads (hub name, local Hugging Face
GPT-2 directory, gptforge checkpoint or run directory), so the model-file checks of
`gptforge.interop` / `gptforge.checkpoint` apply to it as to every other reader. The architecture is
the source's: a `model.*` key the user set (TOML file or command line) that contradicts it is an
error; dropout, attention and pad_vocab are applied, and a smaller model.block_size crops the
position embedding (nanoGPT's crop_block_size). Under torchrun every rank loads the same
weights, before any wrapping: FSDP2 shards what each rank holds.
"""

from __future__ import annotations

from pathlib import Path

from gptforge.config import TrainConfig
from gptforge.errors import GPTForgeError
from gptforge.model import GPT, PRESETS, SWITCHES, GPTConfig
from gptforge.training import checkpoint as ckpt
from gptforge.training import distributed as distrib

# must agree with the source when the user set them
ARCHITECTURE = ("n_layer", "n_head", "n_embd", *SWITCHES)


def initial_model(cfg: TrainConfig, resume_from: Path | None, env: distrib.DistEnv, tokenizer=None,
                  data_where: str = "the data") -> tuple[GPT, dict]:
    """The raw model (CPU, fp32) a run starts from, and a record of where its weights came from
    (saved in the run's config under `resolved.weights`). `tokenizer` is the data's: a random
    model's vocabulary is its vocabulary, and a checkpoint or init_from source trained with
    another tokenizer is an error naming both.

    With `resume_from` the model has the checkpoint's architecture and still random weights: the
    trainer's restore() loads them with the optimizer, so init_from is not applied again."""
    from gptforge import tokenizer as tk

    tokenizer = tokenizer or tk.Tokenizer()
    vocab = tokenizer.vocab_size
    if resume_from is not None:
        from gptforge.checkpoint import model_tokenizer

        tk.check_match(model_tokenizer(resume_from).identity(), f"checkpoint {resume_from}", tokenizer.identity(), data_where)
        saved_model, saved_train = ckpt.checkpoint_meta(resume_from)
        record = {"from": "resume", "checkpoint": str(resume_from)}
        first = (saved_train.get("resolved") or {}).get("weights")
        if isinstance(first, dict):  # how the resumed run itself began
            record["run_began_from"] = first.get("run_began_from", first)
        from gptforge.checkpoint import WEIGHTS, check_weights_header

        if cfg.model.init_from:  # the architecture is the checkpoint's, not the (default) preset's
            config = GPTConfig.from_dict({**saved_model.to_dict(), "attention": cfg.model.attention})
        else:
            config = cfg.model.gpt_config(vocab_size=vocab)
        # before allocating anything: the weights are what config.json says, and the run's model is theirs
        check_weights_header(resume_from / WEIGHTS, saved_model)
        if saved_model.to_dict() | {"attention": None} != config.to_dict() | {"attention": None}:
            raise GPTForgeError(f"{resume_from}: checkpoint architecture {saved_model} differs from the configured {config}")
        return GPT(config), record
    if not cfg.model.init_from:
        return GPT(cfg.model.gpt_config(vocab_size=vocab)), {"from": "random init", "seed": cfg.run.seed}
    return _init_from(cfg, env, tokenizer, data_where)


def _init_from(cfg: TrainConfig, env: distrib.DistEnv, tokenizer, data_where: str) -> tuple[GPT, dict]:
    from gptforge.interop.load import open_source

    source = cfg.model.init_from
    # rank 0 first: a hub name is downloaded once, then the other ranks find it in the cache;
    # each rank locates the source once and reads its config.json once
    found = open_source(source) if env.is_main else None
    distrib.barrier(env)
    found = found or open_source(source)
    from gptforge import tokenizer as tk

    tk.check_match(found.tokenizer().identity(), f"model.init_from {source}", tokenizer.identity(), data_where)
    base = found.config
    overrides = check_against_source(cfg, base, source, tokenizer.vocab_size)
    model = found.load(**overrides)
    record = {"from": "init_from", "source": source, "path": str(found.path), "model": model.config.to_dict()}
    if model.config.block_size < base.block_size:
        record["cropped_block_size"] = [base.block_size, model.config.block_size]
    return model, record


def check_against_source(cfg: TrainConfig, source_cfg: GPTConfig, source: str, vocab_size: int = 50257) -> dict:
    """The load overrides for `source`, after checking every user-set model.* key against its
    architecture (one error listing all contradictions)."""
    m, explicit = cfg.model, cfg.explicit
    configured: dict[str, tuple[str, object]] = {}  # architecture field -> (the key that set it, value)
    if "model.preset" in explicit and m.preset in PRESETS:  # a preset the user named stands for its sizes
        for key, value in PRESETS[m.preset].items():
            if key in ARCHITECTURE:
                configured[key] = (f"model.preset {m.preset!r} ({key})", value)
        if source_cfg.vocab_size != vocab_size:  # a preset's vocabulary is the data tokenizer's
            configured["vocab_size"] = (f"model.preset {m.preset!r} (vocab_size)", vocab_size)
    for key in ARCHITECTURE:
        value = getattr(m, key)
        if f"model.{key}" in explicit and value is not None:
            configured[key] = (f"model.{key}", value)
    problems = [
        f"{name} is {value!r} but {source} has {key} {getattr(source_cfg, key)!r}"
        for key, (name, value) in configured.items()
        if value != getattr(source_cfg, key)
    ]
    if "model.arch" in explicit and m.arch != source_cfg.recipe:
        problems.append(f"model.arch is {m.arch!r} but {source} is a {source_cfg.recipe} model")
    overrides = {"dropout": m.dropout, "attention": m.attention, "pad_vocab": m.pad_vocab}
    if "model.block_size" in explicit and m.block_size is not None:
        if m.block_size > source_cfg.block_size:
            problems.append(f"model.block_size {m.block_size} exceeds {source}'s block_size {source_cfg.block_size} "
                            "(it can only be cropped)")
        overrides["block_size"] = m.block_size
    if problems:
        raise GPTForgeError(
            f"model.init_from {source}: the architecture comes from the source, and the config contradicts it: "
            + "; ".join(problems) + " (drop those keys, or pick another source)"
        )
    return overrides


def seq_len_for(cfg: TrainConfig, config: GPTConfig) -> int:
    """data.seq_len, or the model's block_size; never longer than the model's context."""
    if cfg.data.seq_len > config.block_size:
        where = f" (from model.init_from {cfg.model.init_from})" if cfg.model.init_from else ""
        raise GPTForgeError(f"data.seq_len ({cfg.data.seq_len}) exceeds the model's block_size ({config.block_size}){where}")
    return cfg.data.seq_len or config.block_size
