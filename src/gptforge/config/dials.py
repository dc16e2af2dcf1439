"""The depth and budget dials: one number for the model's size, one for the run's length.

`model.depth N` derives the shape (width = depth x aspect_ratio, rounded up to a multiple of
head_dim; heads = width / head_dim) and scales the learning rates and weight decay tuned at the
default run (width 256, batch 4,096 tokens, 550 steps). `run.tokens_per_param` or
`run.target_flops` derive run.max_steps from a token horizon, and `optim.batch_tokens auto` the
batch from that horizon. A key the user set (cfg.explicit) wins over its derived value. Without
these keys nothing changes. The rules and their reasons: docs/scaling.md, "Depth and budget dials".

`derive` writes what it chose into the config's sections and records it in cfg.resolved["dials"]
(saved in config.json and every checkpoint); given a checkpoint's record it applies that instead,
so a resumed run keeps the horizon it started with.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gptforge.errors import GPTForgeError

if TYPE_CHECKING:  # the schema imports this module through config.model
    from gptforge.config.schema import TrainConfig
    from gptforge.model import GPTConfig

REF_WIDTH = 256  # the default model's width, where optim.* were tuned
REF_BATCH = 4096  # the default run's batch, tokens
REF_TOKENS = 550 * 4096  # the default run's horizon, tokens
BATCH_EXPONENT = 0.383  # B_opt ~ D^0.383 (Power Lines, arXiv 2505.13738; nanochat's rule)
ADAMW_LRS = ("optim.lr", "optim.embed_lr", "optim.head_lr")  # scaled by (width/256)^-0.5
DECAYS = ("optim.weight_decay", "optim.muon_weight_decay")
RECORD = "dials"  # the entry of cfg.resolved


def shape(depth: int, aspect_ratio: int, head_dim: int) -> dict[str, int]:
    """n_layer, n_embd, n_head of model.depth: width = depth * aspect_ratio rounded up to a
    multiple of head_dim, so that every head is exactly head_dim wide (nanochat's rule)."""
    width = -(-depth * aspect_ratio // head_dim) * head_dim
    return {"n_layer": depth, "n_embd": width, "n_head": width // head_dim}


def scaling_params(model) -> int:
    """N of the horizon: the blocks and the LM head, not the lookups (wpe, an untied wte): the
    model's non-embedding count, the N of the 6N in the MFU FLOPs estimate and nanochat's scaling
    params (transformer matrices + lm_head)."""
    return model.num_params(non_embedding=True)


def auto_batch(tokens: float, unit: int) -> int:
    """optim.batch_tokens auto: 4096 * (D / (550 * 4096))^0.383, the default run's batch at its
    horizon carried by the Power Lines exponent, rounded (in log2) to unit * 2^k, k >= 0, where
    unit = seq_len * world_size (one sequence per rank)."""
    predicted = REF_BATCH * (tokens / REF_TOKENS) ** BATCH_EXPONENT
    return unit * 2 ** max(0, round(math.log2(predicted / unit)))


def meta_model(config: GPTConfig):
    """The model on the meta device: parameter counts and FLOPs of any size without memory."""
    import torch

    from gptforge.model import GPT

    with torch.device("meta"):
        return GPT(config)


def _get(cfg: TrainConfig, dotted: str):
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), key)


def _set(cfg: TrainConfig, dotted: str, value) -> None:
    section, _, key = dotted.partition(".")
    setattr(getattr(cfg, section), key, value)


def active(cfg: TrainConfig) -> bool:
    """Whether any dial is set (else derive changes nothing)."""
    return bool(cfg.model.depth or cfg.run.tokens_per_param or cfg.run.target_flops or cfg.optim.batch_tokens == 0)


def derive(cfg: TrainConfig, vocab_size: int, world_size: int = 1, saved: dict | None = None) -> list[str]:
    """Apply the dials to cfg (keys the user set are left alone) and record them in
    cfg.resolved["dials"]; return the banner's lines, each value with what it came from.
    `saved`: a checkpoint's record (resolved["dials"]), applied as it is: a resumed run keeps its
    horizon, batch and rates. A cfg already derived keeps its own record likewise."""
    saved = saved if saved is not None else cfg.resolved.get(RECORD)
    if saved:
        values = saved.get("values", {})
        for key, value in values.items():
            if key not in cfg.explicit:
                _set(cfg, key, value)
        cfg.resolved[RECORD] = saved
        given = {k.partition(".")[2]: k for k in values if k in cfg.explicit}  # set again on resume: theirs
        return [f"{line.split()[0]} {_get(cfg, given[line.split()[0]])} (set)" if line.split()[0] in given
                else f"{line} (kept from the run's start)" for line in saved.get("lines", [])]
    if not active(cfg):
        return []
    m, o, r = cfg.model, cfg.optim, cfg.run
    values: dict[str, float | int] = {}
    lines: list[str] = []
    config = m.gpt_config(vocab_size)
    if m.depth:
        derived = shape(m.depth, m.aspect_ratio, m.head_dim)
        width = derived["n_embd"]
        how = {"n_layer": f"depth {m.depth}",
               "n_embd": f"depth {m.depth} x aspect_ratio {m.aspect_ratio}"
                         + (f" = {m.depth * m.aspect_ratio}, rounded up to a multiple of head_dim {m.head_dim}"
                            if width != m.depth * m.aspect_ratio else ""),
               "n_head": f"n_embd {width} / head_dim {m.head_dim}"}
        for key in ("n_layer", "n_embd", "n_head"):
            lines.append(f"{key} {getattr(config, key)} " + ("(set)" if getattr(m, key) is not None else f"= {how[key]}"))
    model = meta_model(config)
    n = scaling_params(model)
    seq_len = cfg.data.seq_len or config.block_size
    per_token = model.flops_per_token(seq_len)
    tokens, source = None, ""
    if r.tokens_per_param:
        tokens, source = r.tokens_per_param * n, f"tokens_per_param {r.tokens_per_param:g} x {n / 1e6:.2f}M params"
    elif r.target_flops:
        tokens, source = r.target_flops / per_token, f"target_flops {r.target_flops:.3g} / {per_token / 1e6:.2f}M FLOPs per token"
    batch = o.batch_tokens
    if batch == 0:
        if tokens is None:  # validation refuses this; a Python caller may not have validated
            raise GPTForgeError("optim.batch_tokens auto needs a token horizon: set run.tokens_per_param or run.target_flops")
        unit = seq_len * world_size
        batch = values["optim.batch_tokens"] = auto_batch(tokens, unit)
        predicted = REF_BATCH * (tokens / REF_TOKENS) ** BATCH_EXPONENT
        lines.append(f"batch_tokens {batch} = {REF_BATCH} x ({tokens:,.0f} / {REF_TOKENS:,} tokens)^{BATCH_EXPONENT} "
                     f"= {predicted:,.0f}, rounded to a power-of-two multiple of seq_len {seq_len} x world_size {world_size}")
    if tokens is not None and "run.max_steps" not in cfg.explicit:
        steps = values["run.max_steps"] = max(1, round(tokens / batch))
        lines.append(f"max_steps {steps} = {source} / {batch} tokens per step"
                     f" ({steps * batch:,} tokens, {steps * batch * per_token:.3g} FLOPs)")
    if m.depth:
        lines += _scale_optim(cfg, values, config.n_embd, batch, (values.get("run.max_steps") or r.max_steps) * batch)
    for key, value in values.items():
        _set(cfg, key, value)
    cfg.resolved[RECORD] = {"values": values, "lines": lines}
    return lines


def _scale_optim(cfg: TrainConfig, values: dict, width: int, batch: int, tokens: int) -> list[str]:
    """The learning rates and weight decays tuned at the default run, carried to this width, batch
    and horizon (nanochat's rules): AdamW's lrs x (width/256)^-0.5; Muon's lr unchanged by width
    (its update is orthogonalised and scaled by the matrix's shape); every lr x (B/4096)^0.5;
    weight decay x (B/4096)^0.5 x (550*4096 / D) (constant T_epoch = B/(lr wd D), arXiv 2405.13698),
    capped at 1: below the default run's horizon the rule would raise it past where it was tuned
    (a 6-step run would get 367x), and lr x wd near 1 would flip the weights' sign."""
    lines = []
    by_width = (width / REF_WIDTH) ** -0.5
    by_batch = (batch / REF_BATCH) ** 0.5
    by_horizon = min(1.0, by_batch * REF_TOKENS / tokens)  # never above the tuned value: see the doc
    horizon_note = f"x ({batch}/{REF_BATCH})^0.5 x ({REF_TOKENS:,}/{tokens:,} tokens)"
    batch_note = f" x ({batch}/{REF_BATCH})^0.5" if batch != REF_BATCH else ""
    rules = {key: (by_width * by_batch, f"x ({width}/{REF_WIDTH})^-0.5{batch_note}", "") for key in ADAMW_LRS}
    rules["optim.muon_lr"] = (by_batch, batch_note.lstrip() or "unchanged", "; across widths Muon's shape scaling carries it")
    for key in DECAYS:
        rules[key] = (by_horizon, horizon_note if by_horizon != 1
                      else f"unchanged: {horizon_note[2:]} = {by_batch * REF_TOKENS / tokens:.3g}, capped at 1", "")
    for key, (factor, note, tail) in rules.items():
        name, base = key.partition(".")[2], _get(cfg, key)
        if key in cfg.explicit:
            lines.append(f"{name} {base:g} (set)")
        elif not base:  # 0: off (a decay) or optim.lr's (an lr)
            lines.append(f"{name} 0 ({'= lr' if key.endswith('_lr') else 'off'})")
        else:
            values[key] = base * factor
            lines.append(f"{name} {base * factor:.4g} ({note}" + (f" from {base:g}" if factor != 1 else "") + f"{tail})")
    return lines


def preview(cfg: TrainConfig, vocab_size: int, world_size: int = 1, saved: dict | None = None) -> str:
    """The dry run's text: the derived values and what they come from, and the model and run they
    make, without data, weights or a run directory."""
    lines = derive(cfg, vocab_size, world_size, saved)
    config = cfg.model.gpt_config(vocab_size)
    model = meta_model(config)
    seq_len = cfg.data.seq_len or config.block_size
    tokens = cfg.run.max_steps * cfg.optim.batch_tokens
    per_token = model.flops_per_token(seq_len)
    out = [f"dry run: nothing written (run.dir {cfg.run.dir})",
           f"model: {model.num_params() / 1e6:.2f}M parameters ({scaling_params(model) / 1e6:.2f}M without the lookups), {config}",
           *(f"dial {line}" for line in lines),
           f"run: {cfg.run.max_steps} steps x {cfg.optim.batch_tokens} tokens = {tokens:,} tokens "
           f"({tokens / scaling_params(model):.3g} per param), {per_token / 1e6:.2f}M FLOPs per token, "
           f"{tokens * per_token:.3g} FLOPs",
           f"optim: lr {cfg.optim.lr:.4g} | embed_lr {cfg.optim.embed_lr:.4g} | head_lr {cfg.optim.head_lr:.4g} | "
           f"muon_lr {cfg.optim.muon_lr:.4g} | weight_decay {cfg.optim.weight_decay:.4g} | "
           f"muon_weight_decay {cfg.optim.muon_weight_decay:.4g}"]
    return "\n".join(out)
