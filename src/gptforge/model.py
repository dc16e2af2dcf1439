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
        problems = []
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"model.{name} must be a positive integer, got {value!r}")
        if not problems and self.n_embd % self.n_head:
            problems.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.attention not in ("flash", "manual"):
            problems.append(f"model.attention must be 'flash' or 'manual', got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if problems:
            raise GPTForgeError("; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GPTForgeError(f"unknown GPTConfig keys {unknown}; valid keys: {sorted(known)}")
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


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross_entropy(x @ weight.T [:, :vocab], targets, ignore_index=-1), fused and chunked.

    The plain path keeps the (N, V) logits, an fp32 copy, the log-softmax and their gradients:
    about a dozen passes over N x 50257 floats (on a CPU as costly as the head's matmuls; on a
    GPU ~20 GB for 64 x 1024 tokens). Here the rows go through in chunks of `rows` (sized per
    device by the caller: see gptforge.device.lm_head_chunks): a chunk's logits are made by one
    matmul (in the autocast dtype where autocast is on, as autocast would), turned in place, a
    block of `block_rows` rows at a time (cache-sized on CPUs), into their gradient softmax -
    one-hot in fp32, and multiplied straight away into the chunk's share of d loss / d x and
    d loss / d weight, kept in fp32. So no more than one chunk of logits ever exists, and
    backward only scales those two. In fp16 the gradient would underflow before GradScaler's
    factor is known, so there backward recomputes each chunk's logits and scales by it first.
    Same loss and gradients as the plain path up to float rounding; padded vocabulary columns
    get zero gradient.
    """

    ROWS_ELEMENTS = 1 << 21  # logits per elementwise block on a CPU: 8 MB of fp32, cache-sized
    CHUNK_ELEMENTS = 1 << 26  # logits per matmul chunk when the caller does not say: 256 MB of fp32

    @staticmethod
    def forward(ctx, x, weight, targets, vocab: int, rows: int = 0, block_rows: int = 0):
        # x (N, C), weight (V_padded, C), targets (N,) with -1 = not scored
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        ctx.dtypes = (x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)  # what autocast does for a matmul; no-ops in fp32
        N, C = x.shape
        rows, block_rows = _chunk_sizes(rows, block_rows, weight.size(0))
        need_x, need_w = ctx.needs_input_grad[:2]
        recompute = dtype == torch.float16 and (need_x or need_w)
        store = (need_x or need_w) and not recompute
        with torch.autocast(dev, enabled=False):
            valid = targets != -1  # (N,)
            count = valid.sum()
            t = targets.clamp(min=0).unsqueeze(1)  # (N, 1)
            grad_x = torch.empty(N, C, dtype=torch.float32, device=x.device) if store and need_x else None
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=x.device) if store and need_w else None
            loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            for a in range(0, N, rows):
                b = min(N, a + rows)
                logits = x[a:b] @ weight.t()  # (n, V_padded): becomes the chunk's gradient
                loss_sum += _chunk_loss(logits, t[a:b], valid[a:b], vocab, block_rows, grad=store)
                if store:
                    _add_chunk_grads(logits, x[a:b], weight, grad_x, grad_w, a)
                del logits  # before the next chunk's matmul: one chunk alive at a time
        ctx.backward_done = False
        ctx.sizes, ctx.recompute = (vocab, rows, block_rows), recompute
        if recompute:
            ctx.save_for_backward(x, weight, targets, count)
        else:
            ctx.save_for_backward(grad_x, grad_w, count)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.recompute:
            if ctx.backward_done:  # the buffers below are scaled in place
                raise RuntimeError("LinearCrossEntropy: backward through the same loss twice is not supported")
            ctx.backward_done = True
            grad_x, grad_w, count = ctx.saved_tensors  # sums of (softmax - one-hot) products
            scale = grad_loss.float() / count
            gx = grad_x.mul_(scale).to(ctx.dtypes[0]) if grad_x is not None else None
            gw = grad_w.mul_(scale).to(ctx.dtypes[1]) if grad_w is not None else None
            return gx, gw, None, None, None, None
        x, weight, targets, count = ctx.saved_tensors  # fp16: recompute, scaled before the cast
        vocab, rows, block_rows = ctx.sizes
        scale = grad_loss.float() / count  # GradScaler's factor included: no underflow
        need_x, need_w = ctx.needs_input_grad[:2]
        N = x.size(0)
        with torch.autocast(x.device.type, enabled=False):
            valid, t = targets != -1, targets.clamp(min=0).unsqueeze(1)
            gx = torch.empty(x.shape, dtype=torch.float32, device=x.device) if need_x else None
            gw = torch.empty(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
            for a in range(0, N, rows):
                b = min(N, a + rows)
                logits = x[a:b] @ weight.t()
                _chunk_loss(logits, t[a:b], valid[a:b], vocab, block_rows, grad=True, scale=scale)
                _add_chunk_grads(logits, x[a:b], weight, gx, gw, a)
                del logits
        return (gx.to(ctx.dtypes[0]) if gx is not None else None,
                gw.to(ctx.dtypes[1]) if gw is not None else None, None, None, None, None)


def _add_chunk_grads(g, x, weight, grad_x, grad_w, a: int) -> None:
    """grad_x[a:a+n] = g @ weight and grad_w (+)= g.T @ x for the chunk at row a with gradient g
    (n, V_padded): straight into the fp32 buffers where the dtypes allow (fp32), else through a
    cast; the first chunk writes grad_w, later ones add to it."""
    if grad_x is not None:
        if g.dtype == grad_x.dtype:
            torch.mm(g, weight, out=grad_x[a : a + g.size(0)])  # (n, C)
        else:
            grad_x[a : a + g.size(0)] = g @ weight
    if grad_w is not None:
        if g.dtype == grad_w.dtype:
            torch.mm(g.t(), x, out=grad_w) if a == 0 else grad_w.addmm_(g.t(), x)  # (V_padded, C)
        elif a == 0:
            grad_w.copy_(g.t() @ x)
        else:
            grad_w += g.t() @ x


def _chunk_sizes(rows: int, block_rows: int, padded_vocab: int) -> tuple[int, int]:
    """(rows per matmul chunk, rows per elementwise block); 0 = the defaults (a CPU's sizes)."""
    rows = rows if rows > 0 else max(1, LinearCrossEntropy.CHUNK_ELEMENTS // padded_vocab)
    block_rows = block_rows if block_rows > 0 else max(1, LinearCrossEntropy.ROWS_ELEMENTS // padded_vocab)
    return rows, min(rows, block_rows)


def _chunk_loss(logits, t, valid, vocab: int, block_rows: int, grad: bool, scale=None) -> torch.Tensor:
    """Summed loss of a chunk's rows; with grad, turns logits (n, V_padded) in place into
    (softmax - one-hot) * valid (* scale), zero in the padded columns."""
    loss_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
    for a in range(0, logits.size(0), block_rows):
        b = min(logits.size(0), a + block_rows)
        block = logits[a:b]  # (n, V_padded)
        z = block[:, :vocab].float()  # (n, V): a view in fp32, a copy in bf16/fp16
        lse = torch.logsumexp(z, dim=1)  # (n,)
        loss_sum += ((lse - z.gather(1, t[a:b]).squeeze(1)) * valid[a:b]).sum()
        if grad:
            z.sub_(lse.unsqueeze(1)).exp_()  # softmax
            z.scatter_add_(1, t[a:b], -torch.ones_like(z[:, :1]))  # - one-hot
            keep = valid[a:b, None].to(z.dtype)  # (n, 1): ignored rows get no gradient
            z.mul_(keep if scale is None else keep * scale)
            if z.data_ptr() != block.data_ptr():
                block[:, :vocab].copy_(z)
            block[:, vocab:].zero_()  # padded columns: never a prediction
    return loss_sum


def lm_head_token_losses(x, weight, targets, vocab: int, rows: int = 0, block_rows: int = 0) -> torch.Tensor:
    """cross_entropy(x @ weight.T [:, :vocab], targets, reduction="none", ignore_index=-1): (N,)
    fp32, 0 where ignored, computed `rows` rows at a time so that without grad (evaluation) no
    more than one chunk of logits and its fp32 copy ever exist."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    x, weight = x.to(dtype), weight.to(dtype)
    rows, block_rows = _chunk_sizes(rows, block_rows, weight.size(0))
    out = []
    with torch.autocast(dev, enabled=False):
        for a in range(0, x.size(0), rows):
            logits = x[a : a + rows] @ weight.t()  # (n, V_padded)
            for i in range(0, logits.size(0), block_rows):
                z = logits[i : i + block_rows, :vocab].float()  # (m, V)
                out.append(F.cross_entropy(z, targets[a + i : a + i + z.size(0)], ignore_index=-1, reduction="none"))
            del logits, z  # before the next chunk's matmul: one chunk alive at a time
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float32)


# the chunked loop is plain Python over in-place ops: torch.compile runs it as it is (a graph
# break), rather than tracing thousands of slices
_fused_lm_loss = torch.compiler.disable(LinearCrossEntropy.apply)


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
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        return_logits: bool = True,
        loss_reduction: str = "mean",
        loss_rows: int = 0,
        loss_block_rows: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab_size) and the fp32 cross-entropy loss
        against targets (B, T) (ignore_index -1), or None without targets. With a KV cache, idx
        continues the cached sequence. last_only returns logits for the last position only.
        return_logits=False (with targets) returns (None, loss): the same loss and gradients,
        computed without keeping the (B, T, V) logits (see LinearCrossEntropy), for training;
        with loss_reduction="none" as well, the per-token losses (B, T) in fp32 (0 where ignored),
        for evaluation. loss_rows / loss_block_rows size its row chunks (0 = defaults; the caller
        picks them per device: gptforge.device.lm_head_chunks)."""
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
        if targets is not None and not return_logits:
            head = (x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), self.config.vocab_size,
                    loss_rows, loss_block_rows)
            if loss_reduction == "none":
                return None, lm_head_token_losses(*head).view(B, T)
            return None, _fused_lm_loss(*head)
        if last_only and targets is None:
            x = x[:, -1:, :]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V_padded)
        if self.config.pad_vocab:
            # padded columns are never a prediction: dropping them keeps the loss and sampling
            # identical to the unpadded model's
            logits = logits[..., : self.config.vocab_size]  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

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
