"""Muon (momentum orthogonalized by Newton-Schulz) for the blocks' matrices: one plain process,
DDP, and FSDP2, whose parameters are row shards (DTensors) of each matrix.

The default (no variant) is torch.optim.Muon's update, op for op, so its numbers are torch's bit
for bit: Nesterov momentum by lerp, five quintic Newton-Schulz iterations in bf16 with torch's
coefficients, eps and step count (read from torch.optim.Muon's signature), decoupled weight decay
`p *= 1 - lr * wd`, and the step `p -= adjust(lr, shape) * O` with torch's adjust_lr_fn rules.
Its state is torch's (one `momentum_buffer` per matrix), so checkpoints move between the two.

Under FSDP2 the momentum buffer stays a shard (its update is elementwise); the Nesterov update
is gathered to the whole matrix (DTensor.full_tensor), orthogonalized on every rank, and each rank
keeps its own rows of the result. Every rank rather than one owner per matrix: the result is the
one process's bit for bit given the same gathered update, it takes one collective per matrix
(an owner scheme needs a gather and a scatter), and Newton-Schulz is ~4e-6 of a step's FLOPs at
GPT-2 small, so doing it W times costs nothing measurable (docs/modern-recipe.md).

The variants, each off by default (docs/modern-recipe.md names their sources):
- ns="polar_express": per-iteration coefficients (Amsel et al. 2025) instead of one quintic.
- normuon: per-neuron second-moment normalization of the orthogonalized update (NorMuon).
- cautious_wd: weight decay only where the update and the parameter agree in sign.
- momentum_warmup: momentum ramps linearly from 0.85 to the group's over this many steps.
- split: a parameter that stacks several matrices by rows (the model's `fused_matrices()`: c_attn's
  q, k, v; SwiGLU's gate and up) is orthogonalized, and its lr shape-adjusted, block by block, as
  if each were its own parameter (nanochat keeps them apart).
Their state (NorMuon's per-neuron second moment, the step count) is per parameter, in the
optimizer's state dict, so resume is exact.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate

_TORCH_DEFAULTS = {k: v.default for k, v in inspect.signature(torch.optim.Muon.__init__).parameters.items()
                   if v.default is not inspect.Parameter.empty}
NS_COEFFICIENTS: tuple[float, float, float] = _TORCH_DEFAULTS["ns_coefficients"]
NS_STEPS: int = _TORCH_DEFAULTS["ns_steps"]
EPS: float = _TORCH_DEFAULTS["eps"]

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): the coefficients of each of
# 5 iterations, computed for safety factor 2e-2 and cushion 2, as nanochat uses them
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.01  # the input scaled to spectral norm < 1 / 1.01, as the coefficients assume
NS_CHOICES = ("torch", "polar_express")
NORMUON_BETA2 = 0.95  # NorMuon's second-moment decay (the paper's and nanochat's)
NORMUON_FLOOR = 1e-10
MOMENTUM_WARMUP_START = 0.85  # modded-nanogpt's and nanochat's starting momentum
ADJUST_LR = ("original", "match_rms_adamw")


@dataclass(frozen=True)
class MuonVariant:
    """Which of the variants a Muon applies (all off: torch.optim.Muon's update)."""

    ns: str = "torch"
    normuon: bool = False
    cautious_wd: bool = False
    momentum_warmup: int = 0
    split: bool = False

    def __post_init__(self):
        if self.ns not in NS_CHOICES:
            raise ValueError(f"ns must be one of {NS_CHOICES}, got {self.ns!r}")
        if self.momentum_warmup < 0:
            raise ValueError(f"momentum_warmup must be >= 0, got {self.momentum_warmup}")

    def describe(self) -> str:
        on = [f"ns {self.ns}"] if self.ns != "torch" else []
        on += ["normuon"] * self.normuon + ["cautious wd"] * self.cautious_wd
        on += [f"momentum warmup {self.momentum_warmup}"] * bool(self.momentum_warmup)
        on += ["split fused matrices"] * self.split
        return ", ".join(on)


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's adjust_lr_fn: original scales by sqrt(max(1, rows/cols)) (Keller Jordan's),
    match_rms_adamw by 0.2 * sqrt(max(rows, cols)) (Moonshot's, to reuse AdamW's lr)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR}, got {adjust_lr_fn!r}")


def orthogonalize(update: torch.Tensor, ns: str = "torch", coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  steps: int = NS_STEPS, eps: float = EPS) -> torch.Tensor:
    """The (approximate) orthogonal factor of a 2-D `update`, in bf16: quintic iterations
    X <- a X + (b A + c A^2) X with A = X X^T on the wide orientation. torch: one (a, b, c) `steps`
    times from X / ||X||_F (torch's own op order, so bitwise its result); polar_express: the
    paper's coefficients per iteration from X / (1.01 ||X||_F + 1e-6)."""
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    if ns == "torch":
        x.div_(x.norm().clamp(min=eps))
        schedule = (coefficients,) * steps
    else:
        x = x / (x.norm() * POLAR_EXPRESS_SAFETY + 1e-6)
        schedule = POLAR_EXPRESS[:steps]
    for a, b, c in schedule:
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def normuon_dim(shape: torch.Size) -> int:
    """The dimension NorMuon averages over: the columns (one statistic per row) of a tall or square
    matrix, the rows of a wide one (per the longer side's neurons, as nanochat)."""
    return -1 if shape[0] >= shape[1] else -2


def normuon_scale(o: torch.Tensor, v: torch.Tensor, beta2: float = NORMUON_BETA2) -> torch.Tensor:
    """NorMuon on a whole orthogonalized update `o` (fp32): v <- lerp(v, mean(o^2), 1 - beta2) per
    neuron (in place), then o / sqrt(v), rescaled to o's Frobenius norm (so the lr keeps its
    meaning and only the per-neuron balance changes)."""
    v.lerp_(o.square().mean(dim=normuon_dim(o.shape), keepdim=True), 1 - beta2)
    scaled = o * v.clamp_min(NORMUON_FLOOR).rsqrt()
    return scaled * (o.norm() / scaled.norm().clamp_min(NORMUON_FLOOR))


def warmup_momentum(target: float, step: int, warmup: int) -> float:
    """The momentum at `step` (from 0): linear from 0.85 to `target` over `warmup` steps."""
    if warmup <= 0:
        return target
    frac = min(step / warmup, 1.0)
    return (1 - frac) * MOMENTUM_WARMUP_START + frac * target


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a (sharded) DTensor, on every rank; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` as `param` holds its own (its local shard under FSDP2):
    Replicate -> the parameter's placements is a local slice, no communication."""
    if not isinstance(param, DTensor):
        return full
    mesh = param.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, param.placements).to_local()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update and param-group keys, for plain tensors and FSDP2 DTensors, with
    the variants of MuonVariant. The groups' keys are torch's (lr, weight_decay, momentum,
    nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn); the variant is the optimizer's, not
    a group's, so a checkpoint's param_groups are the same with or without one. `row_blocks` (used
    by variant.split) maps a parameter's name (a group's "param_names") to the number of matrices
    it stacks by rows."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None,
                 variant: MuonVariant = MuonVariant(), row_blocks: dict[str, int] | None = None):
        if not lr >= 0 or not momentum >= 0 or not weight_decay >= 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if adjust_lr_fn not in (None, *ADJUST_LR):
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR}, got {adjust_lr_fn!r}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        self.variant = variant
        self.row_blocks = dict(row_blocks or {})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got one of shape {tuple(p.shape)}")

    def _state_of(self, p: torch.Tensor) -> dict:
        """The parameter's state, created on its first step: the momentum buffer (a shard like the
        gradient under FSDP2), and the variants' (whole-matrix statistics, a CPU step count)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        if self.variant.normuon and "normuon_v" not in state:
            rows, cols = p.shape
            shape = (rows, 1) if normuon_dim(p.shape) == -1 else (1, cols)  # one per row, or per column
            state["normuon_v"] = torch.zeros(shape, dtype=torch.float32, device=_local(p).device)
        if self.variant.momentum_warmup and "step" not in state:
            state["step"] = torch.tensor(0.0)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        v = self.variant
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                if p.grad is None:
                    continue
                state = self._state_of(p)
                momentum = group["momentum"]
                if v.momentum_warmup:
                    momentum = warmup_momentum(momentum, int(state["step"].item()), v.momentum_warmup)
                    state["step"] += 1
                buf, grad = state["momentum_buffer"], p.grad
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                blocks = self.row_blocks.get(name, 1) if v.split else 1
                ns_args = (v.ns, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if blocks > 1:  # each stacked matrix on its own, its lr adjusted for its own shape
                    o = torch.cat([orthogonalize(b, *ns_args) for b in _whole(update).chunk(blocks, dim=0)])
                    shape = torch.Size((p.shape[0] // blocks, p.shape[1]))
                else:
                    o, shape = orthogonalize(_whole(update), *ns_args), p.shape
                if v.normuon:
                    o = normuon_scale(o.float(), state["normuon_v"])
                o = _like(o, p)
                w = _local(p)
                step_lr = adjusted_lr(lr, group["adjust_lr_fn"], shape)
                if v.cautious_wd and wd:
                    w.mul_(1 - lr * wd * ((o * w) >= 0).to(w.dtype))
                else:
                    w.mul_(1 - lr * wd)
                w.add_(o, alpha=-step_lr)
        return loss
