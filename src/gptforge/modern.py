"""The modern recipe, in one file of the same shape as model.py.

Decoder-only transformer: token embedding (no learned positions: rotary embeddings rotate each
head's queries and keys by their position), pre-RMSNorm blocks (norm -> causal self-attention
with RMS-normed queries and keys -> add; norm -> SwiGLU MLP -> add), a final RMSNorm, an LM
head of its own (untied), no biases and zero-initialized residual output projections; a tanh
logit softcap `softcap * tanh(logits / softcap)` is a switch (off by default: neutral in the
ablation; in the loss path too when on: gptforge.loss). Every component has a switch in
`ModernConfig` for ablations; with the defaults the function is Qwen3's (RMSNorm + RoPE + QK-norm
+ SwiGLU + untied head), so a checkpoint exports as `Qwen3ForCausalLM` (gptforge.hf_modern).

Module names follow model.py (`transformer.wte`, `transformer.h[i].attn.c_attn`, `.mlp.c_proj`,
`ln_1`, `ln_2`, `transformer.ln_f`, `lm_head`): every 2-D parameter under `transformer.h` is a
matrix of a block (what Muon optimizes), the rest are embeddings, the head and gains.

Knows nothing of devices, DDP, autocast or torch.compile, as model.py. Shapes: B batch, T time,
C channels (n_embd), H heads, D head size (C // H), F the MLP's hidden width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.errors import GPTForgeError
from gptforge.loss import HeadLoss, softcap as cap_logits
from gptforge.model import PAD_MULTIPLE, KVCache, config_from_dict, shape_problems

NORM_EPS = 1e-6  # RMSNorm / LayerNorm epsilon, and the rms_norm_eps of the Qwen3/Llama export
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "relu2", "gelu")


@dataclass
class ModernConfig:
    """The architecture, and nothing else. The fields shared with GPTConfig mean the same."""

    block_size: int = 1024  # longest sequence; size of the rotary tables (or of wpe with rope off)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm (none in the modern recipe)
    attention: str = "flash"  # "flash" (scaled_dot_product_attention) | "manual" (explicit mask)
    pad_vocab: bool = False  # pad the embedding/LM head to a multiple of 128 rows
    arch: str = "modern"  # what gptforge.arch dispatches on; saved with the checkpoint
    rope: bool = True  # rotary position embeddings; off = GPT-2's learned positions (wpe)
    rope_base: float = 10000.0  # rotary base (theta)
    qk_norm: bool = True  # RMSNorm (with a gain) over each head's queries and keys, before RoPE
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu (hidden F = 8C/3 rounded to 64: the 4x MLP's params and FLOPs) | relu2 | gelu (4C)
    tie_embeddings: bool = False  # LM head = token embedding (one Parameter)
    zero_init: bool = True  # residual output projections start at zero (each block starts as identity)
    softcap: float = 0.0  # logits -> softcap * tanh(logits / softcap); 0 = off (neutral at CPU scale; blocks HF export)

    @property
    def padded_vocab_size(self) -> int:
        if not self.pad_vocab:
            return self.vocab_size
        return math.ceil(self.vocab_size / PAD_MULTIPLE) * PAD_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """F: 4C, or for SwiGLU (three matrices, not two) 8C/3 rounded to a multiple of 64, so its
        parameters and FLOPs are the 4x MLP's (exactly at C = 768: F = 2048)."""
        if self.mlp == "swiglu":
            return max(64, 64 * round(8 * self.n_embd / 3 / 64))
        return 4 * self.n_embd

    def validate(self) -> "ModernConfig":
        problems = shape_problems(self)
        if not problems and self.rope and self.head_dim % 2:
            problems.append(f"model.rope needs an even head size, got n_embd / n_head = {self.head_dim}")
        if self.arch != "modern":
            problems.append(f"ModernConfig.arch must be 'modern', got {self.arch!r}")
        if self.norm not in NORMS:
            problems.append(f"model.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.mlp not in MLPS:
            problems.append(f"model.mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if not self.softcap >= 0:
            problems.append(f"model.softcap must be >= 0 (0 = off), got {self.softcap!r}")
        if not self.rope_base > 0:
            problems.append(f"model.rope_base must be > 0, got {self.rope_base!r}")
        if problems:
            raise GPTForgeError("; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModernConfig":
        return config_from_dict(cls, d)


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 and cast back, as Qwen3's: under autocast the queries and keys
    arrive in bf16 while the gain is fp32 (torch's fused kernel wants one dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps).to(x.dtype)


def make_norm(config: ModernConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(size, eps=NORM_EPS)
    return nn.LayerNorm(size, eps=NORM_EPS, bias=config.bias)


class Rotary(nn.Module):
    """cos/sin tables (block_size, D) of rotary embeddings, in the rotate-half convention of
    transformers' Llama/Qwen3 (frequency i pairs channel i with channel i + D/2), so an export
    copies the weights unchanged. fp32, non-persistent: recomputed, never saved."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        self.block_size, self.head_dim, self.base = config.block_size, config.head_dim, config.rope_base
        cos, sin = self.tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        D = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))  # (D/2,)
        t = torch.arange(self.block_size, dtype=torch.int64, device=device).float()  # (block_size,)
        freqs = torch.outer(t, inv_freq)  # (block_size, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (block_size, D)
        return emb.cos(), emb.sin()

    def forward(self, x: torch.Tensor, past: int) -> torch.Tensor:
        """x (B, H, T, D) at positions [past, past + T) -> x rotated by its positions."""
        T = x.size(2)
        cos = self.cos[past : past + T].to(x.dtype)  # (T, D)
        sin = self.sin[past : past + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, H, T, D/2)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModernConfig, layer: int):
        super().__init__()
        self.n_head, self.n_embd, self.layer = config.n_head, config.n_embd, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_OUTPUT = True  # zero (zero_init) or N(0, 0.02/sqrt(2*n_layer)): see init_weights
        self.q_norm = RMSNorm(config.head_dim, eps=NORM_EPS) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, eps=NORM_EPS) if config.qk_norm else None
        self.rotary = Rotary(config) if config.rope else None
        self.dropout = config.dropout
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.flash = config.attention == "flash"
        if not self.flash:  # the explicit lower-triangular mask, as model.py
            mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
            self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        D = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, D) for t in (q, k, v))  # (B, T, H, D)
        if self.q_norm is not None:  # over each head's D, before the rotation (Qwen3's order)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        past = kv_cache.pos if kv_cache is not None else 0
        if self.rotary is not None:  # positions continue past the cached prefix
            q, k = self.rotary(q, past), self.rotary(k, past)
        if kv_cache is not None:
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
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, S)
            att = att.masked_fill(~self.bias[:, :, past : past + T, :S], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """swiglu: c_proj(silu(gate) * up) with c_fc = [gate; up] (2F, C); relu2: c_proj(relu(c_fc x)^2);
    gelu: GPT-2's tanh-GELU."""

    def __init__(self, config: ModernConfig):
        super().__init__()
        self.kind, hidden = config.mlp, config.mlp_hidden
        width = 2 * hidden if self.kind == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_OUTPUT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 2F) or (B, T, F)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # 2 x (B, T, F)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModernConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class Modern(nn.Module):
    def __init__(self, config: ModernConfig):
        super().__init__()
        config.validate()
        self.config = config
        V = config.padded_vocab_size
        parts = dict(wte=nn.Embedding(V, config.n_embd))
        if not config.rope:
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one Parameter, shared storage
        self.head_loss = HeadLoss()  # the trainer may choose the fused path
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) matrices and embeddings, zero biases, unit gains; the residual output
        projections (attn.c_proj, mlp.c_proj) zero with zero_init, else GPT-2's N(0,
        0.02/sqrt(2 * n_layer)). The untied head is N(0, 0.02) like the rest. The rotary tables are
        recomputed (a model built on the meta device gets them here)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if getattr(module, "RESIDUAL_OUTPUT", False):
                    if self.config.zero_init:
                        module.weight.zero_()
                    else:
                        module.weight.normal_(0.0, residual_std, generator=generator)
                elif module is not self.lm_head or not self.config.tie_embeddings:
                    module.weight.normal_(0.0, 0.02, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Rotary) and module.cos.device.type != "meta":
                cos, sin = module.tables(module.cos.device)
                module.cos.copy_(cos)
                module.sin.copy_(sin)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (soft-capped logits (B, T, vocab_size), None), or with targets
        (B, T) (-1 = not scored) -> (logits, fp32 cross-entropy loss) through `self.head_loss`,
        which caps the logits before the cross-entropy on either path. With a KV cache, idx
        continues the cached sequence (rotary positions offset by kv_cache.pos)."""
        B, T = idx.size()
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {past + T} exceeds the model's block_size {self.config.block_size}"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        if not self.config.rope:
            x = x + self.transformer.wpe(torch.arange(past, past + T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is not None:
            return self.head_loss(x, self.lm_head.weight, targets, self.config.vocab_size, softcap=self.config.softcap)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V): padded columns never predicted
        return cap_logits(logits, self.config.softcap), None

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied head counted once). non_embedding subtracts the lookups that
        are no matmul: wpe, and wte when the head is untied (the head's matmul stays counted)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward + backward (PaLM appendix B): 6N + 12*L*H*Q*T."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * T
