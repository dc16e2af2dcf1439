"""The LM-head loss: how the final hidden states meet the targets, for every model here.

Two paths compute the same loss and gradients (up to float rounding):
- `plain`: logits = x @ W.T, then cross-entropy on their fp32 copy, as nanoGPT does. Simple, and
  compiled (on a GPU) the cross-entropy fuses into the kernels that read the logits; it holds the
  (B, T, V) logits.
- `fused`: `LinearCrossEntropy`, a chunked autograd function that never holds more than one
  chunk of logits: eagerly, each chunk is turned into its gradient in place, in cache-sized
  blocks (a CPU); compiled, each chunk is one graph of matmul, loss and gradient (a GPU).

A model calls its `head_loss` (a `HeadLoss`) from `forward(idx, targets)`: the one it was built
with (`GPT(config, head_loss)`; the trainer gives it to the raw model before wrapping,
training.distributed.wrap), or one passed to forward (evaluation's per-token losses). The path,
chunk sizes and compilation per device are chosen by gptforge.measure (choose_lm_head_loss,
lm_head_chunks), so the model's code holds no device policy. Shapes: N rows (B * T), C channels, V vocabulary (V_padded with padding rows that are
never a prediction).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import GPTForgeError  # relative: loss.py travels with model.py (gptforge.interop.remote)

PATHS = ("plain", "fused")
COMPILE_BACKEND = "inductor"  # of the compiled loss functions (tests use "aot_eager": the same graphs, no codegen)


@dataclass(frozen=True)
class HeadLoss:
    """How a model's forward turns hidden states and targets into a loss.

    path: "plain" (logits + cross_entropy) or "fused" (chunked, no (B, T, V) logits);
    rows / block_rows: the fused path's chunk sizes (0 = a CPU's defaults);
    reduction: "mean" (training: one fp32 scalar over the scored targets) or "none"
    (evaluation: fp32 per-token losses (B, T), 0 where the target is -1);
    compiled: the plain path's cross-entropy, or each chunk of the fused path's training loss,
    runs as a torch.compile'd graph (inside an already compiled model: traced into its graph)."""

    path: str = "plain"
    rows: int = 0
    block_rows: int = 0
    reduction: str = "mean"
    compiled: bool = False

    def __post_init__(self):
        if self.path not in PATHS:
            raise GPTForgeError(f"LM-head loss path must be one of {PATHS}, got {self.path!r}")
        if self.reduction not in ("mean", "none"):
            raise GPTForgeError(f"LM-head loss reduction must be 'mean' or 'none', got {self.reduction!r}")

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                 softcap: float = 0.0):
        """x (B, T, C) final hidden states, weight (V_padded, C) the LM head, targets (B, T) with -1
        = not scored -> (logits (B, T, vocab) or None on the fused path, loss). softcap > 0: the
        logits are softcap * tanh(logits / softcap) (the modern model's), on both paths."""
        B, T, C = x.shape
        if self.path == "fused":
            head = (x.reshape(B * T, C), weight, targets.reshape(-1), vocab, self.rows, self.block_rows)
            if self.reduction == "none":
                return None, lm_head_token_losses(*head, softcap=softcap).view(B, T)
            return None, _fused_lm_loss(*head, self.compiled, softcap)
        logits = softcap_logits(F.linear(x, weight)[..., :vocab], softcap)  # (B, T, V): padded columns never predicted
        loss = _maybe_compiled(_plain_loss, self.compiled)(logits, targets, self.reduction)
        return logits, loss if self.reduction == "mean" else loss.view(B, T)


def softcap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): logits bounded in (-cap, cap), near-identity for small ones; cap 0 = as is."""
    return logits if not cap else cap * torch.tanh(logits / cap)



def _plain_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """cross_entropy of the logits' fp32 copy (B, T, V) against targets (B, T), -1 not scored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                           reduction=reduction)


@functools.cache
def _compile(fn, backend: str):
    return torch.compile(fn, backend=backend)


def _maybe_compiled(fn, compiled: bool):
    """fn, or its compiled graph (one per input shape, recompiled with dynamic rows on a second
    shape). Inside a model that is being compiled, fn itself: it is traced into the model's graph."""
    if not compiled or torch.compiler.is_compiling():
        return fn
    return _compile(fn, COMPILE_BACKEND)


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross_entropy(x @ weight.T [:, :vocab], targets, ignore_index=-1), fused and chunked.

    The plain path keeps the (N, V) logits, an fp32 copy, the log-softmax and their gradients:
    about a dozen passes over N x 50257 floats (on a CPU as costly as the head's matmuls; on a
    GPU ~20 GB for 64 x 1024 tokens). Here the rows go through in chunks of `rows` (sized per
    device by the caller: see gptforge.measure.lm_head_chunks): a chunk's logits are made by one
    matmul (in the autocast dtype where autocast is on, as autocast would), turned into their
    gradient softmax - one-hot in fp32, and multiplied straight away into the chunk's share of
    d loss / d x and d loss / d weight, kept in fp32. Eagerly (`compiled` False: a CPU) the logits
    are turned in place, a block of `block_rows` rows at a time, cache-sized; compiled (a GPU),
    each chunk is one graph (`_chunk_step`: matmul, loss, gradient, both gradient matmuls), so a
    chunk costs a few fused kernels instead of ~10 elementwise passes over its logits. So no more
    than one chunk of logits ever exists, and backward only scales those two. In fp16 the
    gradient would underflow before GradScaler's factor is known, so there backward recomputes
    each chunk's logits and scales by it first. Same loss and gradients as the plain path up to
    float rounding; padded vocabulary columns get zero gradient.
    """

    ROWS_ELEMENTS = 1 << 21  # logits per elementwise block on a CPU: 8 MB of fp32, cache-sized
    CHUNK_ELEMENTS = 1 << 26  # logits per matmul chunk when the caller does not say: 256 MB of fp32

    @staticmethod
    def forward(ctx, x, weight, targets, vocab: int, rows: int = 0, block_rows: int = 0, compiled: bool = False,
                softcap: float = 0.0):
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
            if compiled:
                _compiled_chunks(x, weight, t, valid, vocab, rows, None, grad_x, grad_w, loss_sum, softcap)
            else:
                for a in range(0, N, rows):
                    b = min(N, a + rows)
                    logits = x[a:b] @ weight.t()  # (n, V_padded): becomes the chunk's gradient
                    loss_sum += _chunk_loss(logits, t[a:b], valid[a:b], vocab, block_rows, grad=store, softcap=softcap)
                    if store:
                        _add_chunk_grads(logits, x[a:b], weight, grad_x, grad_w, a)
                    del logits  # before the next chunk's matmul: one chunk alive at a time
        ctx.backward_done = False
        ctx.sizes, ctx.recompute, ctx.compiled, ctx.softcap = (vocab, rows, block_rows), recompute, compiled, softcap
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
            return gx, gw, None, None, None, None, None, None
        x, weight, targets, count = ctx.saved_tensors  # fp16: recompute, scaled before the cast
        vocab, rows, block_rows = ctx.sizes
        scale = grad_loss.float() / count  # GradScaler's factor included: no underflow
        need_x, need_w = ctx.needs_input_grad[:2]
        N = x.size(0)
        with torch.autocast(x.device.type, enabled=False):
            valid, t = targets != -1, targets.clamp(min=0).unsqueeze(1)
            gx = torch.empty(x.shape, dtype=torch.float32, device=x.device) if need_x else None
            gw = torch.empty(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
            if ctx.compiled:
                _compiled_chunks(x, weight, t, valid, vocab, rows, scale, gx, gw, softcap=ctx.softcap)
            else:
                for a in range(0, N, rows):
                    b = min(N, a + rows)
                    logits = x[a:b] @ weight.t()
                    _chunk_loss(logits, t[a:b], valid[a:b], vocab, block_rows, grad=True, scale=scale, softcap=ctx.softcap)
                    _add_chunk_grads(logits, x[a:b], weight, gx, gw, a)
                    del logits
        return (gx.to(ctx.dtypes[0]) if gx is not None else None,
                gw.to(ctx.dtypes[1]) if gw is not None else None, None, None, None, None, None, None)


def _chunk_step(x, weight, t, valid, vocab: int, scale, need_x: bool, need_w: bool, softcap: float = 0.0):
    """One chunk of LinearCrossEntropy as one graph (what is compiled): x (n, C) and weight
    (V_padded, C) in the compute dtype, t (n, 1) targets clamped to >= 0, valid (n,) ->
    (summed loss of the valid rows, d(sum)/dx (n, C) fp32 or None, this chunk's share of
    d(sum)/dweight (V_padded, C) fp32 or None), the gradients times `scale` where given. The
    arithmetic of _chunk_loss + _add_chunk_grads, written as whole-chunk ops for the compiler."""
    logits = x @ weight.t()  # (n, V_padded)
    z = logits[:, :vocab].float()  # (n, V)
    if softcap:
        th = torch.tanh(z / softcap)
        z = softcap * th
    lse = torch.logsumexp(z, dim=1)  # (n,)
    loss = ((lse - z.gather(1, t).squeeze(1)) * valid).sum()
    if not (need_x or need_w):
        return loss, None, None
    p = torch.exp(z - lse.unsqueeze(1))  # softmax
    hit = torch.arange(vocab, device=z.device).unsqueeze(0) == t  # (n, V): the one-hot
    keep = valid.unsqueeze(1).to(z.dtype)  # (n, 1): ignored rows get no gradient
    g = (p - hit.to(z.dtype)) * (keep if scale is None else keep * scale)
    if softcap:
        g = g * (1 - th * th)  # d(softcap * tanh(l / softcap)) / dl
    g = F.pad(g, (0, weight.size(0) - vocab)).to(logits.dtype)  # (n, V_padded): padded columns 0
    gx = (g @ weight).float() if need_x else None  # (n, C)
    gw = (g.t() @ x).float() if need_w else None  # (V_padded, C)
    return loss, gx, gw


def _compiled_chunks(x, weight, t, valid, vocab: int, rows: int, scale, grad_x, grad_w, loss_sum=None,
                     softcap: float = 0.0) -> None:
    """Every chunk of `rows` rows through the compiled _chunk_step: its loss added to loss_sum,
    its gradients written to grad_x / added to grad_w (the buffers that are not None)."""
    step = _compile(_chunk_step, COMPILE_BACKEND)
    need_x, need_w = grad_x is not None, grad_w is not None
    for a in range(0, x.size(0), rows):
        b = min(x.size(0), a + rows)
        loss, gx, gw = step(x[a:b], weight, t[a:b], valid[a:b], vocab, scale, need_x, need_w, softcap)
        if loss_sum is not None:
            loss_sum += loss
        if need_x:
            grad_x[a:b] = gx
        if need_w:
            grad_w.copy_(gw) if a == 0 else grad_w.add_(gw)
        del loss, gx, gw  # before the next chunk: one chunk alive at a time


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


def _chunk_loss(logits, t, valid, vocab: int, block_rows: int, grad: bool, scale=None, softcap: float = 0.0) -> torch.Tensor:
    """Summed loss of a chunk's rows; with grad, turns logits (n, V_padded) in place into
    (softmax - one-hot) * valid (* scale), zero in the padded columns. softcap > 0: of the capped
    logits c = softcap * tanh(l / softcap), the gradient times dc/dl = 1 - tanh^2."""
    loss_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
    for a in range(0, logits.size(0), block_rows):
        b = min(logits.size(0), a + block_rows)
        block = logits[a:b]  # (n, V_padded)
        z = block[:, :vocab].float()  # (n, V): a view in fp32, a copy in bf16/fp16
        if softcap:
            th = torch.tanh(z / softcap)  # (n, V): kept for the gradient
            z.copy_(th).mul_(softcap)
        lse = torch.logsumexp(z, dim=1)  # (n,)
        loss_sum += ((lse - z.gather(1, t[a:b]).squeeze(1)) * valid[a:b]).sum()
        if grad:
            z.sub_(lse.unsqueeze(1)).exp_()  # softmax
            z.scatter_add_(1, t[a:b], -torch.ones_like(z[:, :1]))  # - one-hot
            keep = valid[a:b, None].to(z.dtype)  # (n, 1): ignored rows get no gradient
            z.mul_(keep if scale is None else keep * scale)
            if softcap:
                z.mul_(th.mul_(th).neg_().add_(1.0))
            if z.data_ptr() != block.data_ptr():
                block[:, :vocab].copy_(z)
            block[:, vocab:].zero_()  # padded columns: never a prediction
    return loss_sum


def lm_head_token_losses(x, weight, targets, vocab: int, rows: int = 0, block_rows: int = 0,
                         softcap: float = 0.0) -> torch.Tensor:
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
                z = softcap_logits(logits[i : i + block_rows, :vocab].float(), softcap)  # (m, V)
                out.append(F.cross_entropy(z, targets[a + i : a + i + z.size(0)], ignore_index=-1, reduction="none"))
            del logits, z  # before the next chunk's matmul: one chunk alive at a time
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float32)


# Inside a compiled model the chunked loss is a graph break (the chunk loop is Python over
# in-place buffers): eagerly it runs as it is; with `compiled` each chunk is its own compiled
# graph (_chunk_step), one per chunk size.
_fused_lm_loss = torch.compiler.disable(LinearCrossEntropy.apply)
