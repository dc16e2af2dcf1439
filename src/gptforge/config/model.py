"""The `model` section: which architecture a run trains (a size preset, a recipe, its switches).

The architecture itself is `gptforge.model.GPTConfig`; `ModelArgs.gpt_config()` resolves it, and
ModelArgs's switch keys are GPTConfig's switch fields, derived here, never listed again: a new
switch on the model's config is a new `model.<switch>` key with its help.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields

from gptforge.config.dials import shape
from gptforge.config.fields import arg
from gptforge.model import RECIPES, SWITCHES, GPTConfig, preset


@dataclass
class _ModelKeys:
    preset: str = arg("mini", "named size: nano, mini, tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    n_layer: int | None = arg(None, "override the preset's number of blocks")
    n_head: int | None = arg(None, "override the preset's number of heads")
    n_embd: int | None = arg(None, "override the preset's width")
    block_size: int | None = arg(None, "override the preset's context length")
    dropout: float = arg(0.0, "dropout in attention, residual and embedding paths")
    attention: str = arg("flash", "flash (scaled_dot_product_attention) | manual (explicit mask)")
    pad_vocab: bool = arg(False, "pad the vocabulary 50257 -> 50304 for faster matmuls")
    init_from: str = arg("", "start from these weights (fresh optimizer, step 0): gpt2 ... gpt2-xl, an HF GPT-2 dir, a gptforge checkpoint or run dir; the architecture is theirs")
    arch: str = arg("modern", "the recipe the switches below start from: gpt2 (GPT-2 exactly) | modern (RoPE, QK-norm, RMSNorm, SwiGLU, untied head, zero-init); the presets size both")
    depth: int = arg(0, "derive the size from the number of blocks: n_embd = depth x aspect_ratio (rounded up to a multiple of head_dim), n_head = n_embd / head_dim, and scale the learning rates and weight decay from the default run's (docs/scaling.md); 0 = off (the preset's size); model.n_layer/n_embd/n_head given win")
    aspect_ratio: int = arg(64, "with model.depth: width per block (depth 4: 256, the default model; depth 12: 768, GPT-2 124M's)")
    head_dim: int = arg(64, "with model.depth: the width of each attention head")

    def gpt_config(self, vocab_size: int = 50257) -> GPTConfig:
        """The architecture these keys describe: the preset's size (or model.depth's shape), model.arch's
        switches, the overrides."""
        dial = self.depth > 0 and self.aspect_ratio > 0 and self.head_dim > 0  # else validation names the bad key
        sizes = shape(self.depth, self.aspect_ratio, self.head_dim) if dial else {}
        sizes |= {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k) is not None}
        switches = {k: getattr(self, k) for k in SWITCHES if getattr(self, k) is not None}
        return preset(self.preset, self.arch, vocab_size=vocab_size, dropout=self.dropout, attention=self.attention,
                      pad_vocab=self.pad_vocab, **sizes, **switches)


def _switch_key(f: dataclasses.Field) -> tuple[str, object, dataclasses.Field]:
    """model.<switch>: unset (None) = model.arch's value; the help is the model config's."""
    recipes = ", ".join(f"{name} {values[f.name]}" for name, values in RECIPES.items())
    tp = typing.get_type_hints(GPTConfig)[f.name]
    return f.name, tp | None, arg(None, f"{f.metadata['help']} (default: model.arch's: {recipes})")


ModelArgs = dataclasses.make_dataclass(
    "ModelArgs", [_switch_key(f) for f in fields(GPTConfig) if f.name in SWITCHES], bases=(_ModelKeys,),
    namespace={"__module__": __name__, "__doc__": "The `model` section: a size preset, a recipe and its switches."})
MODERN_KEYS = SWITCHES  # deprecated name: every switch applies to every recipe
