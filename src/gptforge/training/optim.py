"""The optimizers (AdamW; Muon for the blocks' matrices with AdamW for the rest) and the
learning-rate schedules (warmup + cosine; warmup-stable-decay).

`optim.name adamw`: one torch AdamW, weight decay on the >= 2-D parameters only.
`optim.name muon`: `MuonAdamW`, one optimizer over two: gptforge's `Muon` (training/muon.py:
torch.optim.Muon's update, also under FSDP2, with optional variants) for every 2-D parameter
under `transformer.h.` (attention and MLP matrices), torch's AdamW for the rest: the
embeddings (optim.embed_lr), an untied `lm_head.weight` (optim.head_lr) and the gains and biases
(optim.lr, no decay). Each param group is tagged with its `kind` and `base_lr`; the schedule's
multiplier scales every group's base lr alike.
"""

from __future__ import annotations

import inspect
import math

import torch

from gptforge.config import OptimArgs
from gptforge.training.muon import Muon, MuonVariant

EMBEDDINGS = ("transformer.wte.", "transformer.wpe.", "transformer.ve.")  # ve: value embeddings
HEAD = "lm_head."
BLOCKS = "transformer.h."


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay every >= 2-D parameter (matmul weights, embeddings); not biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied head appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def kind_of(name: str, p: torch.Tensor) -> str:
    """Which group of optim.name muon a parameter belongs to, by its name in the unwrapped model."""
    if p.dim() == 2 and name.startswith(BLOCKS):
        return "muon"
    if name.startswith(EMBEDDINGS):
        return "embed"
    if name.startswith(HEAD):
        return "head"
    return "matrix" if p.dim() >= 2 else "gain"  # "matrix": a >= 2-D parameter outside the blocks (none in GPT-2)


def muon_groups(model: torch.nn.Module, args: OptimArgs) -> list[dict]:
    """The param groups of MuonAdamW: [muon, embed, head, matrix, gain], the empty ones left out.
    named_parameters() lists a tied head once, under its first name (transformer.wte.weight)."""
    names: dict[str, list[str]] = {}
    params: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = kind_of(name, p)
            names.setdefault(kind, []).append(name)
            params.setdefault(kind, []).append(p)
    lr = {"muon": args.muon_lr, "embed": args.embed_lr or args.lr, "head": args.head_lr or args.lr,
          "matrix": args.lr, "gain": args.lr}
    decay = {"muon": args.muon_weight_decay, "embed": args.weight_decay, "head": args.weight_decay,
             "matrix": args.weight_decay, "gain": 0.0}
    return [{"params": params[k], "param_names": names[k], "kind": k, "base_lr": lr[k], "lr": lr[k],
             "weight_decay": decay[k]} for k in ("muon", "embed", "head", "matrix", "gain") if k in params]


def _fused_kwargs(args: OptimArgs, device: torch.device) -> dict:
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu", "mps")
    fused = {"on": True, "off": False, "auto": fused_ok and device.type == "cuda"}[args.fused]
    return {"fused": True} if fused else {}


def muon_variant(args: OptimArgs) -> MuonVariant:
    """The Muon variants optim.muon_* switch on (all off by default: torch.optim.Muon's update)."""
    return MuonVariant(ns=args.muon_ns, normuon=args.muon_normuon, cautious_wd=args.muon_cautious_wd,
                       momentum_warmup=args.muon_momentum_warmup, split=args.muon_split)


class MuonAdamW(torch.optim.Optimizer):
    """Muon (training/muon.py) over the "muon" groups and torch.optim.AdamW over the others, seen as one
    optimizer: param_groups are both optimizers' own group dicts (so the schedule, GradScaler's
    unscale_ and zero_grad reach every parameter), and `state` is one dict that both share (their
    parameters are disjoint), so state_dict() is torch's index-keyed format of all of it (Muon's
    momentum buffers and its variants' statistics, AdamW's moments and step counts) and resume is
    exact. step() is Muon's step, then AdamW's: the wrapper adds nothing to either update.

    A subclass of torch.optim.Optimizer rather than a plain holder because the trainer, fit.py
    and distributed.py treat it as any optimizer (state_dict / load_state_dict, state.clear(),
    param_groups). It cannot take GradScaler's found_inf (Muon has no such input), so it does not
    claim `_step_supports_amp_scaling`: under fp16, GradScaler.step reads the overflow on the host."""

    def __init__(self, groups: list[dict], args: OptimArgs, device: torch.device,
                 row_blocks: dict[str, int] | None = None):
        muon = [g for g in groups if g["kind"] == "muon"]
        rest = [g for g in groups if g["kind"] != "muon"]
        self.muon = Muon(muon, lr=args.muon_lr, momentum=args.muon_momentum, weight_decay=args.muon_weight_decay,
                         adjust_lr_fn=args.muon_adjust_lr, variant=muon_variant(args),
                         row_blocks=row_blocks) if muon else None
        self.adamw = torch.optim.AdamW(rest, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                                       **_fused_kwargs(args, device)) if rest else None
        # the inner optimizers' group dicts themselves (add_param_group appends the dict it is given)
        super().__init__([g for o in self.inner for g in o.param_groups], defaults={})
        self._tags = [(g["kind"], g["base_lr"]) for g in self.param_groups]
        self._share()

    @property
    def inner(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and state (after __init__ and every
        load_state_dict, which replaces both objects)."""
        i = 0
        for o in self.inner:
            n = len(o.param_groups)
            o.param_groups = self.param_groups[i:i + n]
            o.state = self.state
            i += n

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MuonAdamW takes no closure"
        for o in self.inner:
            o.step()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # the groups' kinds and base lrs are this run's config, not the checkpoint's
        for g, (kind, base_lr) in zip(self.param_groups, self._tags):
            g["kind"], g["base_lr"] = kind, base_lr
        self._share()


def make_optimizer(model: torch.nn.Module, args: OptimArgs, device: torch.device,
                   name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over param_groups (optim.name adamw), or MuonAdamW over muon_groups (muon). `model`
    is the unwrapped module (its parameter names decide the groups)."""
    if name == "muon":
        fused = getattr(model, "fused_matrices", None)
        return MuonAdamW(muon_groups(model, args), args, device, fused() if fused else None)
    return torch.optim.AdamW(
        param_groups(model, args.weight_decay),
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        **_fused_kwargs(args, device),
    )


def describe(optimizer: torch.optim.Optimizer, args: OptimArgs) -> str:
    """The banner's line: which parameters each optimizer updates, at which peak lr."""
    def size(g: dict) -> str:
        return f"{sum(p.numel() for p in g['params']) / 1e6:.2f}M"

    if not isinstance(optimizer, MuonAdamW):
        n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        return f"optimizer adamw: {n / 1e6:.2f}M parameters lr {args.lr:g}, weight decay {args.weight_decay:g} on the >= 2-D ones"
    muon, parts = "", []
    for g in optimizer.param_groups:
        n = len(g["params"])
        if g["kind"] == "muon":
            muon = (f"optimizer muon: {n} matrices ({size(g)}) lr {g['base_lr']:g} momentum {g['momentum']:g} "
                    f"wd {g['weight_decay']:g} adjust_lr {g['adjust_lr_fn']}")
            if variant := optimizer.muon.variant.describe():
                muon += f" ({variant})"
            continue
        tables = dict.fromkeys(x.removeprefix("transformer.").split(".")[0] for x in g["param_names"])  # wte, wpe, ve
        what = {"embed": " + ".join(tables), "head": "lm_head",
                "matrix": f"{n} other matrices", "gain": f"{n} gains/biases"}[g["kind"]]
        parts.append(f"{what} ({size(g)}) lr {g['base_lr']:g} wd {g['weight_decay']:g}")
    return (muon or "optimizer muon: no matrices") + " | adamw: " + ", ".join(parts)


def lr_at(step: int, args: OptimArgs, max_steps: int, progress: float | None = None) -> float:
    """optim.lr at `step` (from 0): linear warmup over warmup_steps, then the schedule's decay to
    lr * min_lr_ratio at decay_steps (default: max_steps), constant after.
    cosine: a half cosine from the end of warmup. wsd: flat at lr until the last decay_frac of
    the steps, then linear.
    `progress` (run.max_minutes: the fraction of the time horizon spent, training.clock) keys the
    schedule to it instead of the steps (lr_by_progress); warmup stays in steps, capped by it."""
    if args.schedule not in ("cosine", "wsd"):
        raise ValueError(f"lr_at needs a resolved schedule (training.plan.schedule_name), got {args.schedule!r}")
    max_lr, min_lr = args.lr, args.lr * args.min_lr_ratio
    if progress is not None:
        lr = lr_by_progress(progress, args)
        return min(lr, max_lr * (step + 1) / args.warmup_steps) if step < args.warmup_steps else lr
    decay_steps = args.decay_steps or max_steps
    if step < args.warmup_steps:
        return max_lr * (step + 1) / args.warmup_steps
    if step >= decay_steps:
        return min_lr
    if args.schedule == "wsd":
        start = decay_steps - round(args.decay_frac * decay_steps)
        if step < start:
            return max_lr
        return max_lr + (step - start) / max(1, decay_steps - start) * (min_lr - max_lr)
    progress = (step - args.warmup_steps) / max(1, decay_steps - args.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def lr_by_progress(progress: float, args: OptimArgs) -> float:
    """optim.lr at a fraction `progress` of the horizon (>= 1: lr * min_lr_ratio). wsd: flat until
    1 - decay_frac, then linear to the floor; cosine: a half cosine over the whole horizon."""
    max_lr, min_lr = args.lr, args.lr * args.min_lr_ratio
    if progress >= 1:
        return min_lr
    if args.schedule == "wsd":
        start = 1.0 - args.decay_frac
        if progress < start:
            return max_lr
        return max_lr + (progress - start) / args.decay_frac * (min_lr - max_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * max(0.0, progress))) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, args: OptimArgs) -> dict[str, float]:
    """Set every group's lr for this step: `lr` is optim.lr as scheduled (lr_at, times the
    rollback's scale); a group with another base lr gets base_lr * lr / optim.lr, i.e. the same
    multiplier. Groups at optim.lr (every group of plain AdamW) get `lr` itself, bit for bit as
    before. Returns kind -> lr of the tagged groups (for the metrics row)."""
    out = {}
    for group in optimizer.param_groups:
        base = group.get("base_lr", args.lr)
        group["lr"] = lr if base == args.lr else base * (lr / args.lr)
        if "kind" in group:
            out[group["kind"]] = group["lr"]
    return out
