"""Deprecated: there is one model (gptforge.model.GPT); its config's switches are the architecture."""

from __future__ import annotations

import torch.nn as nn

from gptforge.model import GPT, RECIPES, GPTConfig

ARCHS = tuple(RECIPES)
Config = GPTConfig
Model = GPT


def config_from_dict(d: dict) -> GPTConfig:
    return GPTConfig.from_dict(d)


def replace(config: GPTConfig, **changes) -> GPTConfig:
    """The same architecture with some fields changed (dropout, attention, block_size, ...)."""
    return GPTConfig.from_dict({**config.to_dict(), **changes})


def build_model(config: GPTConfig) -> GPT:
    return GPT(config)


def is_model(module: nn.Module) -> bool:
    return isinstance(module, GPT)


def tied(model: nn.Module) -> bool:
    return model.tied
