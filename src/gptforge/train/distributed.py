"""torchrun's environment, and DDP / FSDP2 wrapping applied from outside the model.

Launched by `torchrun --nproc_per_node=N -m gptforge train ...`, every process reads RANK,
LOCAL_RANK and WORLD_SIZE; a plain `gptforge train` is world size 1 and touches no process group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gptforge.errors import GPTForgeError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        try:
            return cls(
                rank=int(os.environ.get("RANK", 0)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                world_size=int(os.environ.get("WORLD_SIZE", 1)),
            )
        except ValueError as e:
            raise GPTForgeError(f"RANK / LOCAL_RANK / WORLD_SIZE must be integers ({e})") from e


def device_for(env: DistEnv, requested: str) -> str:
    """One device per rank: cuda:LOCAL_RANK under torchrun when CUDA is used."""
    if env.enabled and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{env.local_rank}"
    return requested


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU). No-op for a single process."""
    if not env.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def wrap(model: torch.nn.Module, env: DistEnv, device: torch.device, mode: str, precision: str) -> torch.nn.Module:
    """DDP, or FSDP2 (fully_shard on every block and then the root) for `mode == "fsdp"`."""
    if not env.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if device.type == "cuda" and precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in model.transformer.h:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # the root: embeddings, final LayerNorm, tied head
    return model


def no_sync(model: torch.nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce on every micro-step but the last of an accumulation."""
    if last_micro_step:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
