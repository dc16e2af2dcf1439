"""The one place that dispatches on architecture: GPT-2 (gptforge.model) or modern (gptforge.modern).

A checkpoint's saved `model` section names its architecture by an `arch` key; GPT-2's has none
(as every checkpoint written before the modern model existed), so a missing key is GPT-2.
Everything that builds a model from a saved or configured architecture (checkpoints, resume,
init_from, Hugging Face interop, sampling, eval, bench) comes through here.
"""

from __future__ import annotations

import torch.nn as nn

from gptforge.errors import GPTForgeError
from gptforge.model import GPT, GPTConfig
from gptforge.modern import Modern, ModernConfig

ARCHS = ("gpt2", "modern")
Config = GPTConfig | ModernConfig
Model = GPT | Modern


def arch_of(d: dict) -> str:
    """The architecture a saved `model` section describes ("gpt2" when it names none)."""
    arch = d.get("arch", "gpt2")
    if arch not in ARCHS:
        raise GPTForgeError(f"unknown model.arch {arch!r}; known: {', '.join(ARCHS)}")
    return arch


def config_class(arch: str) -> type:
    if arch not in ARCHS:
        raise GPTForgeError(f"unknown model.arch {arch!r}; known: {', '.join(ARCHS)}")
    return ModernConfig if arch == "modern" else GPTConfig


def config_from_dict(d: dict) -> Config:
    """GPTConfig or ModernConfig of a saved `model` section, validated."""
    d = dict(d)
    if arch_of(d) == "gpt2":
        d.pop("arch", None)  # GPT-2's section is saved without it
        return GPTConfig.from_dict(d)
    return ModernConfig.from_dict(d)


def replace(config: Config, **changes) -> Config:
    """The same architecture with some fields changed (dropout, attention, block_size, ...)."""
    return config_from_dict({**config.to_dict(), **changes})


def build_model(config: Config) -> Model:
    return Modern(config) if isinstance(config, ModernConfig) else GPT(config)


def is_model(module: nn.Module) -> bool:
    return isinstance(module, (GPT, Modern))


def tied(model: nn.Module) -> bool:
    """The LM head is the token embedding (one Parameter): GPT-2 always, modern when tie_embeddings."""
    return model.lm_head.weight is model.transformer.wte.weight
