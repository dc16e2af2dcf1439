"""GPT-2, exactly, in one file.

Decoder-only transformer: token + learned position embeddings, pre-LayerNorm blocks
(LN -> causal self-attention -> add; LN -> 4x MLP with tanh-GELU -> add), a final LayerNorm
and an LM head tied to the token embedding. Parameter names follow Hugging Face's GPT-2
(`transformer.wte`, `h.N.attn.c_attn`, ...) so import/export is a loop of copies.

This module knows nothing of devices, DDP, autocast or torch.compile: the trainer applies
those from outside. Shapes: B batch, T time (sequence), C channels (n_embd), H heads,
D head size (C // H), V vocabulary (padded when `pad_vocab`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.errors import GPTForgeError
from gptforge.loss import HeadLoss

PAD_MULTIPLE = 128  # 50257 -> 50304: a vocabulary that tiles into fast matmuls


@dataclass
class GPTConfig:
    """The architecture, and nothing else."""

    block_size: int = 1024  # longest sequence; size of the position embedding
    vocab_size: int = 50257  # real tokens; GPT-2 BPE has 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    attention: str = "flash"  # "flash" (scaled_dot_product_attention) | "manual" (explicit mask)
    pad_vocab: bool = False  # pad the embedding/LM head to a multiple of 128 rows

    @property
    def padded_vocab_size(self) -> int:
        if not self.pad_vocab:
            return self.vocab_size
        return math.ceil(self.vocab_size / PAD_MULTIPLE) * PAD_MULTIPLE

    def validate(self) -> "GPTConfig":
        problems = shape_problems(self)
        if problems:
            raise GPTForgeError("; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return config_from_dict(cls, d)


def shape_problems(config) -> list[str]:
    """What is wrong with the fields every architecture has (sizes, attention, dropout)."""
    problems = []
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"model.{name} must be a positive integer, got {value!r}")
    if not problems and config.n_embd % config.n_head:
        problems.append(f"model.n_embd ({config.n_embd}) must be divisible by model.n_head ({config.n_head})")
    if config.attention not in ("flash", "manual"):
        problems.append(f"model.attention must be 'flash' or 'manual', got {config.attention!r}")
    if not 0.0 <= config.dropout < 1.0:
        problems.append(f"model.dropout must be in [0, 1), got {config.dropout!r}")
    return problems


def config_from_dict(cls, d: dict):
    """cls(**d).validate(), an unknown key being one error that lists the valid ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise GPTForgeError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(known)}")
    return cls(**d).validate()


# Named presets, as data. GPT-2's four sizes, plus tiny ones that train on a CPU.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # ~30M, CPU-trainable
    "mini": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),  # ~16M, quick CPU runs
    "nano": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests
}


def preset(name: str, **overrides) -> GPTConfig:
    """GPTConfig of a named preset, with field overrides."""
    if name not in PRESETS:
        raise GPTForgeError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides}).validate()


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated to block_size."""

    def __init__(self, config: GPTConfig, batch_size: int, device=None, dtype=None):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # tokens already cached; advanced by GPT.forward after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at [pos, pos+T); return all keys/values so far (B, H, pos+T, D)."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_embd, self.layer = config.n_head, config.n_embd, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # N(0, 0.02/sqrt(2*n_layer)): see GPT.init_weights
        self.dropout = config.dropout
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.flash = config.attention == "flash"
        if not self.flash:  # the explicit lower-triangular mask of the original implementation
            mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
            self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)  # (B, H, past+T, D)
        S = k.size(2)  # number of keys: past + T

        if self.flash:
            mask, causal = None, past == 0
            if past > 0 and T > 1:  # a chunk after a cached prefix: query i sees keys <= past+i
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
                causal = False
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, S)
            att = att.masked_fill(~self.bias[:, :, past : past + T, :S], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        V = config.padded_vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one Parameter, shared storage
        self.head_loss = HeadLoss()  # logits + cross_entropy; the trainer may choose the fused path
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 init: N(0, 0.02) weights and embeddings, zero biases, LayerNorm (1, 0), and the
        residual output projections scaled by 1/sqrt(2 * n_layer) (two residual adds per block)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = residual_std if getattr(module, "RESIDUAL_SCALE_INIT", False) else 0.02
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab_size), None), or with targets (B, T)
        (-1 = not scored) -> (logits, fp32 cross-entropy loss) through `self.head_loss`, whose
        fused path returns no logits (see gptforge.loss). With a KV cache, idx continues the
        cached sequence."""
        B, T = idx.size()
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {past + T} exceeds the model's block_size {self.config.block_size}"
            )
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is not None:
            return self.head_loss(x, self.lm_head.weight, targets, self.config.vocab_size)
        logits = self.lm_head(x)  # (B, T, V_padded)
        # padded columns are never a prediction: dropping them keeps sampling identical to the
        # unpadded model's
        return logits[..., : self.config.vocab_size], None  # (B, T, V)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head counted once). non_embedding subtracts the position
        embedding, as nanoGPT does: the token embedding is used as the LM head's matmul."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward + backward (PaLM appendix B): 6N + 12*L*H*Q*T."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    @classmethod
    def from_pretrained(cls, source: str, **overrides) -> "GPT":
        """Load from a local Hugging Face GPT-2 directory, a gptforge checkpoint directory, or a
        hub name (gpt2 ... gpt2-xl, needs network). Delegates to gptforge.hf."""
        from gptforge.hf import load_pretrained  # lazy: interop stands on the model, not inside it

        return load_pretrained(source, **overrides)
