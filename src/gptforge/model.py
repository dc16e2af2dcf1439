"""The transformer, in one file: GPT-2 exactly and the modern recipe are two presets of its switches.

Decoder-only: token embedding (+ learned positions, or rotary embeddings of each head's queries
and keys), pre-norm blocks (norm -> causal self-attention -> add; norm -> MLP -> add), a final norm
and an LM head. `GPTConfig`'s switches choose each component when the model is built (norm,
its gain, MLP, positions, QK-norm, tied head, biases, init, logit softcap, and nanochat's
techniques: a norm after the embedding, value embeddings with gates, residual and x0 lambdas,
smear, backout), so `forward` reads straight. With the defaults it is GPT-2 (learned positions,
LayerNorm eps 1e-5, tanh-GELU, tied head, biases, GPT-2 init); `RECIPES["modern"]` is Qwen3's
function (RoPE, QK-norm, RMSNorm eps 1e-6, SwiGLU, untied head, no biases) with zero-initialized
residual projections. A switch that is off adds no parameter and changes no number.

Parameter names follow Hugging Face's GPT-2 (`transformer.wte`, `h.N.attn.c_attn`, `mlp.c_fc`,
`ln_1`, `ln_f`, ...): every 2-D parameter under `transformer.h` is a matrix of a block (what Muon
optimizes, the value-embedding gates included), the rest are embeddings (`wte`, `wpe`, the value
embeddings `ve.N`), the head, gains, scalars (the lambdas) and the smear's small gate. The model
knows nothing of devices, DDP, autocast or torch.compile, nor of outside formats (gptforge.interop).

Shapes: B batch, T time, C channels (n_embd), H heads, D head size (C // H), F the MLP's hidden
width, V vocabulary (padded when `pad_vocab`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# Relative imports of sibling files, only torch besides: this file, errors.py and loss.py are the
# modeling code of a `trust_remote_code` export (gptforge.interop.remote), loaded without gptforge.
from .errors import GPTForgeError
from .loss import HeadLoss, softcap_logits

PAD_MULTIPLE = 128  # 50257 -> 50304: a vocabulary that tiles into fast matmuls
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "relu2", "gelu")
ATTENTIONS = ("flash", "manual")
VALUE_EMBEDS = ("off", "alternate", "all")
VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many leading channels (nanochat's)
SMEAR_GATE_CHANNELS = 24  # the smear gate likewise


def _size(default, help: str):
    return field(default=default, metadata={"help": help})


def _switch(default, help: str):
    """A field that chooses a component: a `model.*` config key and CLI flag (gptforge.config)."""
    return field(default=default, metadata={"help": help, "switch": True})


@dataclass
class GPTConfig:
    """The architecture, and nothing else. The defaults are GPT-2's; see RECIPES."""

    block_size: int = _size(1024, "longest sequence: rows of the position embedding or rotary tables")
    vocab_size: int = _size(50257, "real tokens (GPT-2's BPE has 50257)")
    n_layer: int = _size(12, "number of blocks")
    n_head: int = _size(12, "attention heads per block")
    n_embd: int = _size(768, "width C")
    dropout: float = _size(0.0, "dropout in attention, residual and embedding paths")
    attention: str = _size("flash", "flash (scaled_dot_product_attention) | manual (explicit mask)")
    pad_vocab: bool = _size(False, "pad the embedding/LM head to a multiple of 128 rows for faster matmuls")
    bias: bool = _switch(True, "biases in Linear and LayerNorm")
    rope: bool = _switch(False, "rotary position embeddings (false: learned positions, wpe)")
    rope_base: float = _switch(10000.0, "rotary base theta")
    qk_norm: bool = _switch(False, "RMSNorm (with a gain) of each head's queries and keys, before the rotation")
    norm: str = _switch("layernorm", "layernorm | rmsnorm")
    norm_eps: float = _switch(1e-5, "epsilon of every norm")
    mlp: str = _switch("gelu", "gelu (4C, tanh-GELU) | swiglu (hidden 8C/3 rounded to 64: the 4x MLP's params and FLOPs) | relu2 (4C)")
    tie_embeddings: bool = _switch(True, "LM head tied to the token embedding (one Parameter)")
    zero_init: bool = _switch(False, "residual output projections start at zero (else N(0, 0.02/sqrt(2 n_layer)))")
    softcap: float = _switch(0.0, "logits -> softcap * tanh(logits / softcap), e.g. 15; 0 = off (bounds the logits: steadier early training)")
    norm_gain: bool = _switch(True, "norms have a learned gain (false: parameter-free, as nanochat's: no gains to store or tune)")
    embed_norm: bool = _switch(False, "a norm right after the token embedding (nanochat: the residual stream starts at unit RMS)")
    value_embeds: str = _switch("off", "off | alternate | all: per-layer token embeddings mixed into V through an input-dependent gate (ResFormer; nanochat: alternate)")
    resid_lambdas: bool = _switch(False, "a learned per-layer scale of the residual stream before each block (nanochat's init 1.15 -> 1.05)")
    x0_lambdas: bool = _switch(False, "a learned per-layer weight blending the first embedding x0 back in before each block (nanochat's init 0.2 -> 0.05)")
    smear: bool = _switch(False, "add the previous token's embedding through a learned gate (cheap bigram information)")
    backout: bool = _switch(False, "subtract a learned fraction (init 0.2) of the middle layer's residual before the final norm")

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

    @property
    def recipe(self) -> str:
        """"gpt2" when every switch is GPT-2's, else "modern" (the modern recipe or an ablation of it):
        what training policy keys on (optimizer and schedule `auto`)."""
        gpt2 = all(getattr(self, k) == v for k, v in RECIPES["gpt2"].items())
        return "gpt2" if gpt2 else "modern"

    def validate(self) -> "GPTConfig":
        problems = []
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"model.{name} must be a positive integer, got {value!r}")
        if not problems and self.n_embd % self.n_head:
            problems.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not problems and self.rope and self.head_dim % 2:
            problems.append(f"model.rope needs an even head size, got n_embd / n_head = {self.head_dim}")
        if self.attention not in ATTENTIONS:
            problems.append(f"model.attention must be 'flash' or 'manual', got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.norm not in NORMS:
            problems.append(f"model.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.mlp not in MLPS:
            problems.append(f"model.mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if not self.norm_eps > 0:
            problems.append(f"model.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.softcap >= 0:
            problems.append(f"model.softcap must be >= 0 (0 = off), got {self.softcap!r}")
        if self.value_embeds not in VALUE_EMBEDS:
            problems.append(f"model.value_embeds must be one of {', '.join(VALUE_EMBEDS)}, got {self.value_embeds!r}")
        if not self.rope_base > 0:
            problems.append(f"model.rope_base must be > 0, got {self.rope_base!r}")
        if problems:
            raise GPTForgeError("; ".join(problems))
        return self

    def has_value_embed(self, layer: int) -> bool:
        """Whether block `layer` mixes a value embedding into V: every layer, or every other one
        ending at the last (nanochat's placement)."""
        if self.value_embeds == "alternate":
            return layer % 2 == (self.n_layer - 1) % 2
        return self.value_embeds == "all"

    def differences(self, want: dict) -> list[str]:
        """`model.key=value (to wanted)` for each key of `want` whose value this config does not
        have: what an export adapter's `problems` lists."""
        def show(v):
            return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)

        return [f"model.{k}={show(getattr(self, k))} (to {show(v)})" for k, v in want.items() if getattr(self, k) != v]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """The config of a saved `model` section, validated. Two older layouts read the same: GPT-2's
        (no switches: the defaults) and the modern model's (`arch: "modern"`: that recipe under
        the saved keys). An unknown key is one error that lists the valid ones."""
        d = dict(d)
        arch = d.pop("arch", None)
        if arch is not None and arch not in RECIPES:
            raise GPTForgeError(f"unknown model.arch {arch!r}; known: {', '.join(RECIPES)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GPTForgeError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(known)}")
        return cls(**{**RECIPES.get(arch, {}), **d}).validate()


SWITCHES = tuple(f.name for f in fields(GPTConfig) if f.metadata.get("switch"))

# The two recipes, as values of the switches. GPT-2's are GPTConfig's defaults.
RECIPES: dict[str, dict] = {
    "gpt2": {f.name: f.default for f in fields(GPTConfig) if f.name in SWITCHES},
    "modern": dict(bias=False, rope=True, rope_base=10000.0, qk_norm=True, norm="rmsnorm", norm_eps=1e-6,
                   mlp="swiglu", tie_embeddings=False, zero_init=True, softcap=0.0, norm_gain=True, embed_norm=False,
                   value_embeds="off", resid_lambdas=False, x0_lambdas=False, smear=False, backout=False),
}
# The switches GPT-2's and Qwen3's formats have no tensor or op for, at the values they compute.
EXTRAS_OFF = {k: RECIPES["gpt2"][k] for k in ("value_embeds", "resid_lambdas", "x0_lambdas", "smear", "backout")}

# Named sizes, as data. GPT-2's four, plus tiny ones that train on a CPU; any recipe at any size.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),  # ~30M, CPU-trainable
    "mini": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),  # ~16M, quick CPU runs
    "nano": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests
}


def preset(name: str, recipe: str = "gpt2", **overrides) -> GPTConfig:
    """GPTConfig of a named size and recipe, with field overrides."""
    if name not in PRESETS:
        raise GPTForgeError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    if recipe not in RECIPES:
        raise GPTForgeError(f"model.arch must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return GPTConfig(**{**RECIPES[recipe], **PRESETS[name], **overrides}).validate()


def ModernConfig(**overrides) -> GPTConfig:
    """Deprecated: `preset`-free GPTConfig of the modern recipe, `GPTConfig(**RECIPES["modern"], ...)`."""
    warnings.warn("ModernConfig is deprecated: use GPTConfig(**RECIPES['modern'], ...)", DeprecationWarning, stacklevel=2)
    overrides.pop("arch", None)
    return GPTConfig(**{**RECIPES["modern"], **overrides})


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated to block_size."""

    def __init__(self, config: GPTConfig, batch_size: int, device=None, dtype=None):
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # tokens already cached; advanced by GPT.forward after all layers ran
        self.last_embedding: torch.Tensor | None = None  # (B, 1, C) of token pos-1, for the smear (Smear)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at [pos, pos+T); return all keys/values so far (B, H, pos+T, D)."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class RMSNorm(nn.RMSNorm):
    """RMSNorm computed in fp32 and cast back, as Qwen3's: under autocast the queries and keys
    arrive in bf16 while the gain is fp32 (torch's fused kernel wants one dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None  # None: parameter-free
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)


def make_norm(config: GPTConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(size, eps=config.norm_eps, elementwise_affine=config.norm_gain)
    return nn.LayerNorm(size, eps=config.norm_eps, elementwise_affine=config.norm_gain, bias=config.bias)


class Rotary(nn.Module):
    """cos/sin tables (block_size, D) of rotary embeddings, in the rotate-half convention of
    transformers' Llama/Qwen3 (frequency i pairs channel i with channel i + D/2), so an export
    copies the weights unchanged. fp32, non-persistent: recomputed, never saved."""

    def __init__(self, config: GPTConfig):
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
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_embd, self.layer = config.n_head, config.n_embd, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_OUTPUT = True  # see GPT.init_weights
        self.q_norm = RMSNorm(config.head_dim, eps=config.norm_eps, elementwise_affine=config.norm_gain) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, eps=config.norm_eps, elementwise_affine=config.norm_gain) if config.qk_norm else None
        # value embedding gate: 3 * sigmoid(a linear map of the first channels), one per head, in (0, 3)
        channels = min(VE_GATE_CHANNELS, config.n_embd)
        self.ve_gate = nn.Linear(channels, config.n_head, bias=False) if config.has_value_embed(layer) else None
        if self.ve_gate is not None:
            self.ve_gate.GATE = True  # see GPT.init_weights
        self.rotary = Rotary(config) if config.rope else None
        self.dropout = config.dropout
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.flash = config.attention == "flash"
        if not self.flash:  # the explicit lower-triangular mask of the original implementation
            mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
            self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, ve: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C), and with value embeddings this layer's ve (B, T, C) -> (B, T, C)."""
        B, T, C = x.size()
        D = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        if self.ve_gate is not None:  # value residual: V += gate (per head) * the token's value embedding
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B, T, H)
            v = v + (gate.unsqueeze(-1) * ve.to(v.dtype).view(B, T, self.n_head, D)).view(B, T, C)
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


def _gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")  # GPT-2's GELU


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)  # c_fc = [gate; up]: 2 x (B, T, F)
    return F.silu(gate) * up


def _relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()


ACTIVATIONS = {"gelu": _gelu, "swiglu": _swiglu, "relu2": _relu2}


class MLP(nn.Module):
    """c_proj(act(c_fc x)); SwiGLU's c_fc holds gate and up, (2F, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden
        width = 2 * hidden if config.mlp == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.act = ACTIVATIONS[config.mlp]
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_OUTPUT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, ve)
        x = x + self.mlp(self.ln_2(x))
        return x


class Smear(nn.Module):
    """x_t + lam * sigmoid(gate(x_t[:24])) * x_(t-1): each token's embedding takes in its
    predecessor's through a per-token gate (nanochat's smear; lam starts at 0, the identity). The
    first token has no predecessor; with a KV cache, a chunk's predecessor is the cache's
    `last_embedding`, so decoding step by step equals the full forward."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(min(SMEAR_GATE_CHANNELS, config.n_embd), 1, bias=False)
        self.gate.GATE = True  # see GPT.init_weights
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        prev = x[:, :-1]  # (B, T-1, C)
        if kv_cache is not None and kv_cache.pos > 0:
            prev = torch.cat([kv_cache.last_embedding.to(x.dtype), prev], dim=1)
        else:
            prev = F.pad(prev, (0, 0, 1, 0))  # (B, T, C): zero before the first token
        if kv_cache is not None:
            kv_cache.last_embedding = x[:, -1:]
        gate = self.lam.to(x.dtype) * torch.sigmoid(self.gate(x[..., : self.gate.in_features]))  # (B, T, 1)
        return x + gate * prev


class GPT(nn.Module):
    """The transformer. `head_loss` is how forward(idx, targets) turns hidden states into a loss
    (gptforge.loss.HeadLoss: plain or fused, chunk sizes, compiled): chosen by whoever builds the
    model for a device, so the model's code holds no device policy."""

    def __init__(self, config: GPTConfig, head_loss: HeadLoss | None = None):
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
        if config.embed_norm:
            parts["ln_e"] = make_norm(config, config.n_embd)
        if config.smear:
            parts["smear"] = Smear(config)
        value_embeds = {str(i): nn.Embedding(V, config.n_embd) for i in range(config.n_layer) if config.has_value_embed(i)}
        if value_embeds:
            parts["ve"] = nn.ModuleDict(value_embeds)
        self.transformer = nn.ModuleDict(parts)
        # per-layer scalars on the residual stream; None (no parameter) when off
        L = config.n_layer
        self.resid_lambdas = nn.Parameter(torch.ones(L)) if config.resid_lambdas else None
        self.x0_lambdas = nn.Parameter(torch.zeros(L)) if config.x0_lambdas else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one Parameter, shared storage
        self.head_loss = head_loss or HeadLoss()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, 0.02) matrices and embeddings, zero biases, unit gains; the residual output
        projections (attn.c_proj, mlp.c_proj) zero with zero_init, else GPT-2's N(0,
        0.02/sqrt(2 * n_layer)) (two residual adds per block). Drawn in module order; a tied head
        is drawn again last, as GPT-2's init does. The rotary tables are recomputed (a model built
        on the meta device gets them here). The switches' parameters start as nanochat's: gates
        U(0, 0.02) (value-embedding gates near 1.5, the smear's lam 0), value embeddings like the
        other embeddings, resid_lambdas 1.15 -> 1.05 and x0_lambdas 0.2 -> 0.05 over depth,
        backout 0.2."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if getattr(module, "GATE", False):
                    module.weight.uniform_(0.0, 0.02, generator=generator)
                elif not getattr(module, "RESIDUAL_OUTPUT", False):
                    module.weight.normal_(0.0, 0.02, generator=generator)
                elif self.config.zero_init:
                    module.weight.zero_()
                else:
                    module.weight.normal_(0.0, residual_std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Rotary) and module.cos.device.type != "meta":
                cos, sin = module.tables(module.cos.device)
                module.cos.copy_(cos)
                module.sin.copy_(sin)
            elif isinstance(module, Smear):
                module.lam.zero_()
        depth = torch.arange(self.config.n_layer, dtype=torch.float32) / max(self.config.n_layer - 1, 1)  # 0 -> 1
        if self.resid_lambdas is not None:
            self.resid_lambdas.copy_(1.15 - 0.10 * depth)
        if self.x0_lambdas is not None:
            self.x0_lambdas.copy_(0.20 - 0.15 * depth)
        if self.backout_lambda is not None:
            self.backout_lambda.fill_(0.2)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
        head_loss: HeadLoss | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab_size), None), or with targets (B, T)
        (-1 = not scored) -> (logits, fp32 cross-entropy loss) through `head_loss` (default: the
        model's own, `self.head_loss`; evaluation passes per-token losses), whose fused path
        returns no logits (see gptforge.loss). Logits are soft-capped when
        config.softcap is set. With a KV cache, idx continues the cached sequence."""
        B, T = idx.size()
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {past + T} exceeds the model's block_size {self.config.block_size}"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # learned positions (rope rotates q and k in attention instead)
            x = x + self.transformer.wpe(torch.arange(past, past + T, dtype=torch.long, device=idx.device))
        if "ln_e" in self.transformer:
            x = self.transformer.ln_e(x)
        if "smear" in self.transformer:
            x = self.transformer.smear(x, kv_cache)
        x = self.transformer.drop(x)
        x0, middle = x, None
        for i, block in enumerate(self.transformer.h):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x
            if self.x0_lambdas is not None:
                x = x + self.x0_lambdas[i] * x0
            x = block(x, kv_cache, self.value_embedding(idx, i))
            if i == self.config.n_layer // 2:
                middle = x
        if self.backout_lambda is not None:  # remove a share of the middle layer's (lower-level) features
            x = x - self.backout_lambda.to(x.dtype) * middle
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is not None:
            head_loss = head_loss or self.head_loss
            return head_loss(x, self.lm_head.weight, targets, self.config.vocab_size, softcap=self.config.softcap)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V): padded columns never predicted
        return softcap_logits(logits, self.config.softcap), None

    def value_embedding(self, idx: torch.Tensor, layer: int) -> torch.Tensor | None:
        """(B, T, C) value embedding of block `layer`'s tokens, or None where it has none."""
        tables = self.transformer["ve"] if "ve" in self.transformer else {}
        return tables[str(layer)](idx) if str(layer) in tables else None

    @property
    def tied(self) -> bool:
        """The LM head is the token embedding (one Parameter)."""
        return self.lm_head.weight is self.transformer.wte.weight

    def fused_matrices(self) -> dict[str, int]:
        """Parameter name -> the number of matrices it stacks by rows: attention's c_attn holds
        q, k and v; SwiGLU's c_fc holds gate and up (optim.muon_split treats each on its own)."""
        out = {}
        for i in range(self.config.n_layer):
            out[f"transformer.h.{i}.attn.c_attn.weight"] = 3
            if self.config.mlp == "swiglu":
                out[f"transformer.h.{i}.mlp.c_fc.weight"] = 2
        return out

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied head counted once). non_embedding subtracts the lookups that
        are no matmul, as nanoGPT does: wpe, the value embeddings, and wte when the head is untied
        (a tied wte is the head's matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if "ve" in self.transformer:
                n -= sum(p.numel() for p in self.transformer.ve.parameters())
            if not self.tied:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward + backward (PaLM appendix B): 6N + 12*L*H*Q*T."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * T

    @classmethod
    def from_pretrained(cls, source: str, **overrides) -> "GPT":
        """Load from a gptforge checkpoint or run directory, a Hugging Face GPT-2 / Qwen3 / Llama
        directory or a hub name: a shim of `gptforge.load_pretrained` (gptforge.interop), found
        through the package's lazy table when called, so the model imports no interop code."""
        from . import load_pretrained  # the package's lazy table; a relative import, see above

        return load_pretrained(source, **overrides)
