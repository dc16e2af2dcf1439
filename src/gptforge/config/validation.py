"""Validation: every field of a TrainConfig checked together, one error listing every problem.

What a choice key accepts is listed here (PRECISIONS, OPTIMIZERS, ...). Policy that depends on
the model as built (which optimizer `auto` is, whether it runs under FSDP) is the trainer's:
gptforge.training.plan.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import TYPE_CHECKING

from gptforge.errors import GPTForgeError
from gptforge.model import PRESETS

if TYPE_CHECKING:  # the schema imports this module
    from gptforge.config.schema import TrainConfig

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("auto", "cosine", "wsd")
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # what torch.optim.Muon's adjust_lr_fn accepts
MUON_NS = ("torch", "polar_express")  # training/muon.py's orthogonalizations
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what torch, numpy and the checkpoint's tensors hold


def _out_of_range(cfg: TrainConfig) -> list[str]:
    """Every float field finite and every integer field within 64 bits (a value set in Python
    has not passed through set_value's conversion)."""
    p = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for key, tp in typing.get_type_hints(type(values)).items():
            value = getattr(values, key)
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                p.append(f"{section.name}.{key} must be a finite number, got {value}")
            elif isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
                p.append(f"{section.name}.{key} must be an integer from -2**63 to 2**63-1, got {value}")
    return p


def _dials(cfg: TrainConfig) -> list[str]:
    """model.depth, the horizon dials and optim.batch_tokens auto (config.dials)."""
    p = []
    m, o, r = cfg.model, cfg.optim, cfg.run
    for name in ("depth", "aspect_ratio", "head_dim"):
        if getattr(m, name) < (0 if name == "depth" else 1):
            p.append(f"model.{name} must be {'>= 0 (0 = off)' if name == 'depth' else '> 0'}, got {getattr(m, name)}")
    for key, on in (("model.depth", m.depth), ("run.tokens_per_param", r.tokens_per_param), ("run.target_flops", r.target_flops)):
        if on and m.init_from:  # each counts the parameters of the model the config describes
            p.append(f"{key} and model.init_from exclude each other: the weights' source has its own size (give run.max_steps)")
    for name in ("tokens_per_param", "target_flops"):
        if getattr(r, name) < 0:
            p.append(f"run.{name} must be >= 0 (0 = off), got {getattr(r, name)}")
    if r.tokens_per_param and r.target_flops:
        p.append("run.tokens_per_param and run.target_flops each set the horizon: give one")
    horizon = "run.tokens_per_param" if r.tokens_per_param else "run.target_flops" if r.target_flops else None
    if horizon and "run.max_steps" in cfg.explicit:
        p.append(f"run.max_steps and {horizon} each set the number of steps: give one")
    if horizon and r.max_minutes:  # a time budget is the schedule's horizon too (training.clock)
        p.append(f"run.max_minutes and {horizon} each set the schedule's horizon: give one")
    if o.batch_tokens < 0:
        p.append(f"optim.batch_tokens must be > 0, or auto (0), got {o.batch_tokens}")
    elif o.batch_tokens == 0 and not horizon:
        p.append("optim.batch_tokens auto needs a token horizon: set run.tokens_per_param or run.target_flops")
    return p


def validate(cfg: TrainConfig) -> None:
    """Check every field together; one error listing every problem."""
    p: list[str] = _out_of_range(cfg)
    if p:  # the checks below would misread a NaN
        raise GPTForgeError("invalid config: " + "; ".join(p))
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    if m.preset not in PRESETS:
        p.append(f"model.preset: unknown preset {m.preset!r}; known: {', '.join(PRESETS)}")
    else:
        try:
            m.gpt_config()
        except GPTForgeError as e:
            p.append(str(e))
    p += _dials(cfg)
    if o.micro_batch_size < 0:
        p.append(f"optim.micro_batch_size must be > 0, or auto (0), got {o.micro_batch_size}")
    for name in ("max_steps", "keep_last", "log_every"):
        if getattr(r, name) <= 0:
            p.append(f"run.{name} must be > 0, got {getattr(r, name)}")
    for sec, name in (("run", "eval_every"), ("run", "ckpt_every"), ("run", "sample_every"), ("run", "sample_tokens"),
                      ("run", "eval_tokens"), ("run", "hellaswag_every"), ("optim", "warmup_steps"), ("optim", "decay_steps"),
                      ("data", "seq_len"), ("data", "prefetch")):
        if getattr(getattr(cfg, sec), name) < 0:
            p.append(f"{sec}.{name} must be >= 0, got {getattr(getattr(cfg, sec), name)}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        p.append(f"optim.lr must be a positive number, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.weight_decay < 0 or o.grad_clip < 0 or o.eps <= 0:
        p.append("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        p.append(f"optim.beta1/beta2 must be in [0, 1), got {o.beta1}, {o.beta2}")
    if o.name not in ("auto", *OPTIMIZERS):
        p.append(f"optim.name must be one of auto, {', '.join(OPTIMIZERS)}, got {o.name!r}")
    if o.schedule not in SCHEDULES:
        p.append(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    if not 0 <= o.decay_frac <= 1:
        p.append(f"optim.decay_frac must be in [0, 1], got {o.decay_frac}")
    if not (o.muon_lr > 0 and math.isfinite(o.muon_lr)):
        p.append(f"optim.muon_lr must be a positive number, got {o.muon_lr}")
    for name in ("embed_lr", "head_lr", "muon_weight_decay"):
        value = getattr(o, name)
        if not (value >= 0 and math.isfinite(value)):
            p.append(f"optim.{name} must be a number >= 0{' (0 = optim.lr)' if name.endswith('_lr') else ''}, got {value}")
    if not 0 <= o.muon_momentum < 1:
        p.append(f"optim.muon_momentum must be in [0, 1), got {o.muon_momentum}")
    if o.muon_adjust_lr not in MUON_ADJUST_LR:
        p.append(f"optim.muon_adjust_lr must be one of {', '.join(MUON_ADJUST_LR)}, got {o.muon_adjust_lr!r}")
    if o.muon_ns not in MUON_NS:
        p.append(f"optim.muon_ns must be one of {', '.join(MUON_NS)}, got {o.muon_ns!r}")
    if o.muon_momentum_warmup < 0:
        p.append(f"optim.muon_momentum_warmup must be >= 0 (0 = off), got {o.muon_momentum_warmup}")
    if not 0 <= o.ema < 1:
        p.append(f"optim.ema must be in [0, 1) (0 = off), got {o.ema}")
    if o.fused not in ("auto", "on", "off"):
        p.append(f"optim.fused must be auto, on or off, got {o.fused!r}")
    if o.spike_k <= 0 or o.spike_window < 2 or o.spike_max_skips < 1 or not 0 < o.spike_lr_factor <= 1:
        p.append("optim.spike_k > 0, optim.spike_window >= 2, optim.spike_max_skips >= 1, optim.spike_lr_factor in (0, 1]")
    if d.tokenizer != "gpt2" and not (d.tokenizer.startswith("train:") and d.tokenizer[6:].isdigit()
                                      and 257 <= int(d.tokenizer[6:]) <= 1 << 32):
        p.append(f"data.tokenizer must be gpt2 or train:N with N from 257 to 4,294,967,296, got {d.tokenizer!r}")
    if d.order not in ("shuffle", "sequential"):
        p.append(f"data.order must be shuffle or sequential, got {d.order!r}")
    if d.packing not in ("windows", "bestfit"):
        p.append(f"data.packing must be windows or bestfit, got {d.packing!r}")
    if r.precision not in PRECISIONS + ("auto",):
        p.append(f"run.precision must be one of {', '.join(PRECISIONS + ('auto',))}, got {r.precision!r}")
    if r.log not in ("none", "wandb", "tensorboard"):
        p.append(f"run.log must be none, wandb or tensorboard, got {r.log!r}")
    if r.lm_head_loss not in ("auto", "fused", "plain"):
        p.append(f"run.lm_head_loss must be auto, fused or plain, got {r.lm_head_loss!r}")
    if r.dist not in ("ddp", "fsdp"):
        p.append(f"run.dist must be ddp or fsdp, got {r.dist!r}")
    if not r.dir:
        p.append("run.dir must not be empty")
    if r.peak_tflops < 0 or r.max_minutes < 0:
        p.append("run.peak_tflops and run.max_minutes must be >= 0")
    if not p and m.preset in PRESETS and not m.init_from:  # with init_from, checked against the source's
        block = m.gpt_config().block_size
        if d.seq_len > block:
            p.append(f"data.seq_len ({d.seq_len}) exceeds the model's block_size ({block})")
    if p:
        raise GPTForgeError("invalid config: " + "; ".join(p))
