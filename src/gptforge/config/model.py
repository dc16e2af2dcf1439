"""The `model` section: which architecture a run trains (a preset plus overrides).

The architecture itself is `gptforge.model.GPTConfig` or `gptforge.modern.ModernConfig`
(model.arch); `ModelArgs.gpt_config()` resolves it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.arch import ARCHS
from gptforge.config.fields import arg
from gptforge.errors import GPTForgeError
from gptforge.model import PRESETS, GPTConfig, preset
from gptforge.modern import ModernConfig


@dataclass
class ModelArgs:
    preset: str = arg("mini", "named architecture: nano, mini, tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    n_layer: int | None = arg(None, "override the preset's number of blocks")
    n_head: int | None = arg(None, "override the preset's number of heads")
    n_embd: int | None = arg(None, "override the preset's width")
    block_size: int | None = arg(None, "override the preset's context length")
    dropout: float = arg(0.0, "dropout in attention, residual and embedding paths")
    bias: bool | None = arg(None, "biases in Linear and LayerNorm; default: the arch's (gpt2: true, modern: false)")
    attention: str = arg("flash", "flash (scaled_dot_product_attention) | manual (explicit mask)")
    pad_vocab: bool = arg(False, "pad the vocabulary 50257 -> 50304 for faster matmuls")
    init_from: str = arg("", "start from these weights (fresh optimizer, step 0): gpt2 ... gpt2-xl, an HF GPT-2 dir, a gptforge checkpoint or run dir; the architecture is theirs")
    arch: str = arg("modern", "gpt2 (GPT-2 exactly) | modern (RoPE, QK-norm, RMSNorm, SwiGLU, untied head, zero-init: gptforge.modern); the presets size both")
    rope: bool | None = arg(None, "modern: rotary position embeddings (default true; false = learned positions)")
    rope_base: float | None = arg(None, "modern: rotary base theta (default 10000)")
    qk_norm: bool | None = arg(None, "modern: RMSNorm of each head's queries and keys (default true)")
    norm: str | None = arg(None, "modern: rmsnorm (default) | layernorm")
    mlp: str | None = arg(None, "modern: swiglu (default; hidden 8C/3 rounded to 64: the 4x MLP's params and FLOPs) | relu2 | gelu")
    tie_embeddings: bool | None = arg(None, "modern: LM head tied to the token embedding (default false)")
    zero_init: bool | None = arg(None, "modern: residual output projections initialized to zero (default true)")
    softcap: float | None = arg(None, "modern: logits -> softcap * tanh(logits / softcap), e.g. 15 (modded-nanogpt); default 0 = off (measured neutral; a softcap is not exportable to Hugging Face)")

    def gpt_config(self, vocab_size: int = 50257) -> "GPTConfig | ModernConfig":
        """The architecture these keys describe: a GPTConfig (arch gpt2) or a ModernConfig."""
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k) is not None}
        if self.arch not in ARCHS:
            raise GPTForgeError(f"model.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        modern_keys = {k: getattr(self, k) for k in MODERN_KEYS if getattr(self, k) is not None}
        if self.arch == "gpt2":
            if modern_keys:
                raise GPTForgeError(f"model.{next(iter(modern_keys))} applies to model.arch modern only (model.arch is gpt2)")
            return preset(
                self.preset,
                vocab_size=vocab_size,
                dropout=self.dropout,
                bias=True if self.bias is None else self.bias,
                attention=self.attention,
                pad_vocab=self.pad_vocab,
                **overrides,
            )
        if self.preset not in PRESETS:
            raise GPTForgeError(f"unknown model preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        return ModernConfig(
            **{**PRESETS[self.preset], **overrides},
            vocab_size=vocab_size,
            dropout=self.dropout,
            bias=False if self.bias is None else self.bias,
            attention=self.attention,
            pad_vocab=self.pad_vocab,
            **modern_keys,
        ).validate()


MODERN_KEYS = ("rope", "rope_base", "qk_norm", "norm", "mlp", "tie_embeddings", "zero_init", "softcap")  # ModelArgs keys of arch modern only
