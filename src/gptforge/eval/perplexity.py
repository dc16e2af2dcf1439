"""Loss, perplexity and bits per byte of a model over a data split, optionally capped at the first
N tokens.

Every target token counts once: the result is the mean cross-entropy over all scored tokens
(not a mean of per-batch means), so it does not depend on the batch size or on how the split was
cut into batches. Bits per byte, the yardstick that survives a change of tokenizer, is

    bpb = sum of the losses of the targets that are text / (ln 2 x the UTF-8 bytes of those targets)

with each token's bytes from the tokenizer (`Tokenizer.token_bytes`, nanochat's `token_bytes`):
special tokens (<|endoftext|>) have 0 bytes and are left out of both sums. Under torch.distributed
each rank scores its own share of the windows and the sums are all-reduced, so every rank returns
the same numbers.
"""

from __future__ import annotations

import math

import torch

from gptforge.errors import GPTForgeError
from gptforge.loss import HeadLoss

IGNORE_INDEX = -1  # targets equal to this are not scored (the model's convention too)


def _dist():
    """(rank, world_size) of an initialized process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def token_losses(model, x: torch.Tensor, y: torch.Tensor, runtime) -> torch.Tensor:
    """Per-token cross-entropy (B, T) in fp32; the forward runs under the runtime's autocast.

    The LM head and the loss go through the rows in chunks sized for the device (the fused head
    loss with reduction "none"): no (B, T, V) logits, nor their fp32 copy, ever exist, so memory
    does not grow with batch x seq_len x vocabulary."""
    rows, block_rows = runtime.lm_head_chunks(model.config.padded_vocab_size)
    with runtime.autocast():
        _, losses = model(x, y, head_loss=HeadLoss("fused", rows, block_rows, reduction="none"))
    return losses.view(y.shape)  # (B, T); 0 where ignored


@torch.no_grad()
def evaluate_loss(model, loader, runtime, max_tokens: int = 0, progress: bool = False, token_bytes=None) -> dict:
    """Mean next-token loss and perplexity over one pass of `loader` (only its first `max_tokens`
    targets when > 0, counted over all ranks: each rank takes ceil(max_tokens / world_size)).

    `loader` is a ShardLoader-like object: `iter_epoch(max_batches=None)` yields (x, y) int64
    (B, T) batches, and `B`, `T` (ShardLoader's names) bound how many batches the budget reads.
    The model is put in eval mode and given back in the mode it came in.
    `token_bytes`: the UTF-8 bytes of each token id (see the module doc), for bits per byte.
    Returns {"loss": float, "ppl": float, "tokens": int} and, with token_bytes, "bpb" and "bytes".
    """
    if max_tokens < 0:
        raise GPTForgeError(f"max_tokens must be >= 0 (0 = the whole split), got {max_tokens}")
    rank, world = _dist()
    # this rank's share of the budget; ranks may score a few tokens more or less than each other
    budget = math.ceil(max_tokens / world) if max_tokens else 0
    max_batches = None
    B, T = getattr(loader, "B", None), getattr(loader, "T", None)
    if budget and isinstance(B, int) and isinstance(T, int) and B * T > 0:
        max_batches = math.ceil(budget / (B * T))  # so the loader reads (and prefetches) no more

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=max_batches, desc="eval", unit="batch", dynamic_ncols=True, leave=False)

    was_training = model.training
    model.eval()
    # running sums stay on the device: no host sync per batch (the budget is counted on the host
    # in target positions, which equal scored tokens unless targets carry the ignore index)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    n_scored = torch.zeros((), dtype=torch.int64, device=runtime.device)
    text_loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)  # targets that are text
    byte_sum = torch.zeros((), dtype=torch.int64, device=runtime.device)
    tb = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.int64).to(runtime.device)
    positions = 0
    try:
        for x, y in loader.iter_epoch(max_batches=max_batches):
            x = x.to(runtime.device, non_blocking=True)
            y = y.to(runtime.device, non_blocking=True)
            losses = token_losses(model, x, y, runtime).reshape(-1)  # (B*T,)
            scored = y.reshape(-1) != IGNORE_INDEX  # (B*T,)
            if budget and positions + scored.numel() > budget:
                scored[budget - positions :] = False  # the first `budget` targets, in reading order
            loss_sum += (losses.double() * scored).sum()
            n_scored += scored.sum()
            if tb is not None:
                nbytes = tb[y.reshape(-1).clamp(min=0)] * scored  # (B*T,): 0 for specials and unscored
                text_loss_sum += (losses.double() * (nbytes > 0)).sum()
                byte_sum += nbytes.sum()
            positions += scored.numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum.item() / max(int(n_scored), 1):.4f}", refresh=False)
            if budget and positions >= budget:
                break
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()

    sums = [loss_sum.item(), float(n_scored.item()), text_loss_sum.item(), float(byte_sum.item())]
    if world > 1:
        sums = _all_reduce_sum(sums, runtime.device)
    total_loss, total_tokens, text_loss, total_bytes = sums
    if total_tokens == 0:
        raise GPTForgeError("the evaluation split yielded no tokens (is the split empty or shorter than one sequence?)")
    loss = total_loss / total_tokens
    out = {"loss": loss, "ppl": perplexity(loss), "tokens": int(total_tokens)}
    if tb is not None:
        out.update(bpb=bits_per_byte(text_loss, total_bytes), bytes=int(total_bytes))
    return out


def bits_per_byte(loss_sum_nats: float, n_bytes: float) -> float:
    """Summed loss (nats) of text targets over their UTF-8 bytes, in bits: nan without bytes."""
    return loss_sum_nats / (math.log(2) * n_bytes) if n_bytes else float("nan")


def perplexity(loss: float) -> float:
    """exp(loss), inf instead of an OverflowError for a diverged model."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
