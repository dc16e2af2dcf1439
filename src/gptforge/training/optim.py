"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch

from gptforge.config import OptimArgs


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay every >= 2-D parameter (matmul weights, embeddings); not biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied head appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, args: OptimArgs, device: torch.device) -> torch.optim.AdamW:
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu", "mps")
    fused = {"on": True, "off": False, "auto": fused_ok and device.type == "cuda"}[args.fused]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(
        param_groups(model, args.weight_decay),
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        **kwargs,
    )


def lr_at(step: int, args: OptimArgs, max_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr * min_lr_ratio at
    decay_steps (default: max_steps), constant after. `step` counts from 0."""
    max_lr, min_lr = args.lr, args.lr * args.min_lr_ratio
    decay_steps = args.decay_steps or max_steps
    if step < args.warmup_steps:
        return max_lr * (step + 1) / args.warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - args.warmup_steps) / max(1, decay_steps - args.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
