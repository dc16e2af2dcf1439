"""torchrun's environment, DDP / FSDP2 wrapping applied from outside the model, and full-state
checkpoint I/O that works at any world size.

Launch
    One machine:  torchrun --standalone --nproc_per_node=N -m gptforge train [--run.dist ddp|fsdp] ...
    Many:         on every node, torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d \
                  --rdzv_endpoint=HOST:29500 --rdzv_id=JOB -m gptforge train ...
                  (data.dir must hold the same shards on every node; run.dir must be one shared
                  directory, since global rank 0 writes checkpoints and every rank reads them on resume.)
Every process reads RANK, LOCAL_RANK and WORLD_SIZE; a plain `gptforge train` is world size 1 and
touches no process group. Backend nccl with one GPU per rank (cuda:LOCAL_RANK), gloo on CPU.

Failure: an exception on any rank ends that process non-zero with its message on stderr; torchrun
(no restarts by default) then stops the other ranks, so a job never hangs in a collective that a
dead rank will not join. Cleanup after an error does no collective.

Checkpoints hold the *full* state, gathered on rank 0 (FSDP: `get_model_state_dict` /
`get_optimizer_state_dict` with full_state_dict + cpu_offload), in the single-process format:
model.safetensors and the optimizer state dict keyed by parameter index. So any checkpoint loads
at any world size, DDP or FSDP or one process. The loader position saved is the global one (see
`loader_state_for_rank`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gptforge.checkpoint import TIED, model_state_for_saving
from gptforge.errors import GPTForgeError
from gptforge.loss import HeadLoss


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
            env = cls(
                rank=int(os.environ.get("RANK", 0)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                world_size=int(os.environ.get("WORLD_SIZE", 1)),
            )
        except ValueError as e:
            raise GPTForgeError(f"RANK / LOCAL_RANK / WORLD_SIZE must be integers ({e})") from e
        if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
            raise GPTForgeError(f"inconsistent torchrun environment: RANK={env.rank} LOCAL_RANK={env.local_rank} "
                                f"WORLD_SIZE={env.world_size}")
        return env


def device_for(env: DistEnv, requested: str) -> str:
    """One device per rank: cuda:LOCAL_RANK under torchrun when CUDA is used. It is made this
    process's current device at once, before anything touches CUDA (the precision probe, NCCL's
    init, pinned memory): otherwise every rank would also open a context on GPU 0. An explicit
    index (`cuda:0`) under torchrun is an error: it would put every rank on that one GPU."""
    if env.enabled and requested.startswith("cuda:"):
        raise GPTForgeError(f"run.device is {requested!r} under torchrun ({env.world_size} ranks): each rank takes "
                            "cuda:LOCAL_RANK itself; use --run.device cuda (or auto), and CUDA_VISIBLE_DEVICES to "
                            "choose the GPUs")
    if env.enabled and requested in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise GPTForgeError(f"LOCAL_RANK {env.local_rank} has no GPU: this node has {count}; "
                                f"use --nproc_per_node={count} or fewer")
        torch.cuda.set_device(env.local_rank)
        return f"cuda:{env.local_rank}"
    return requested


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU). No-op for a single process."""
    if not env.enabled or dist.is_initialized():
        return
    if device.type not in ("cuda", "cpu"):
        raise GPTForgeError(f"distributed training runs on CUDA (nccl) or CPU (gloo), not on {device.type}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)


def shutdown(env: DistEnv, clean: bool = True) -> None:
    """Leave the process group. After an error (`clean=False`) without any collective: see the
    module doc.

    Gloo's worker threads free each finished collective's work, and with it the Python tensors it
    holds, which needs the GIL. Whoever drops the last reference to the process group (DDP's
    reducer, when the trainer is freed) joins those threads while holding the GIL: if a worker is
    still freeing a work then, both wait forever (seen once in CI: rank 1 hung at exit after
    all_gather_object + barrier). So: a barrier (every earlier collective has finished), then the
    GIL is left free for a moment, so the workers are idle before anything joins them."""
    if env.enabled and dist.is_initialized():
        if clean:
            dist.barrier()
            time.sleep(0.2)
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


# --------------------------------------------------------------------------- wrapping
def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them
    (torch.utils.checkpoint, non-reentrant; dropout replays the same RNG, so losses and
    gradients are the same). Only the instance attribute `forward` of each block is replaced:
    the module tree, parameter names and state-dict keys stay as they are, so checkpoints load
    with and without it, and FSDP2's fully_shard (whose hooks run around a module's __call__,
    and which unshards a block before its backward, i.e. before the recomputation) and DDP see
    the same modules. Without grad (evaluation, sampling with a KV cache) blocks run plainly."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        if getattr(block, "_activation_checkpointing", False):
            continue
        forward = block.forward  # the class's bound method

        def checkpointed(x, kv_cache=None, ve=None, *, _forward=forward):  # Block.forward's arguments
            if kv_cache is not None or not torch.is_grad_enabled():
                return _forward(x, kv_cache, ve)
            return checkpoint(_forward, x, None, ve, use_reentrant=False)

        block.forward = checkpointed
        block._activation_checkpointing = True


def wrap(model: torch.nn.Module, env: DistEnv, device: torch.device, mode: str,
         activation_checkpointing: bool = False, compile: bool = False,
         compile_backend: str = "inductor", head_loss: HeadLoss | None = None) -> torch.nn.Module:
    """Every wrapping from outside the model, in torchtitan's order: activation checkpointing (if
    asked), compile (if asked), then DDP or FSDP2 (fully_shard on every block and then the root)
    for `mode == "fsdp"`. Returns the module the training step calls; `model` itself stays the
    raw module (saved, evaluated, sampled), except that FSDP2 shards it in place.

    compile: one process and DDP compile the whole (DDP-wrapped) model, as before. Under FSDP2
    each block is compiled *before* it is sharded, in place (`Module.compile`: the parameter names
    and state-dict keys stay the same, no `_orig_mod.`); FSDP2's hooks then run between compiled
    blocks instead of being traced into one graph of the whole root. The embeddings and the final
    LayerNorm run eagerly there; the LM-head loss compiles its own graphs (loss.HeadLoss.compiled,
    which the trainer sets under run.compile). Compilation itself happens at the first call.

    Precision: no MixedPrecisionPolicy. FSDP2 keeps fp32 parameters (gathered in fp32) and runs
    under the trainer's autocast like DDP and one process, so the residual stream stays fp32 and
    the numerics are theirs (a bf16 param_dtype policy would cast every block's input and output,
    and the embeddings, to bf16). The cost: all-gathers of fp32 weights, twice a bf16 policy's bytes.

    Call before building the optimizer: FSDP2 replaces the parameters by sharded DTensors. Every
    rank must hold the same initial weights (same seed): FSDP2 shards what each rank has.

    head_loss: the model's LM-head loss for the device (measure.choose_lm_head_loss), given to the
    raw model before any wrapping, so the wrapped forward runs it (DDP's reducer and FSDP2's hooks
    see the head's matmul inside the forward they wrap)."""
    if head_loss is not None:
        model.head_loss = head_loss
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if not env.enabled or mode == "ddp":
        if env.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        return torch.compile(model, backend=compile_backend) if compile else model
    if mode != "fsdp":
        raise GPTForgeError(f"run.dist must be ddp or fsdp, got {mode!r}")
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        if compile:
            block.compile(backend=compile_backend)
        fully_shard(block)
    fully_shard(model)  # the root: embeddings, final LayerNorm, tied head
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reset_after_abort(model: torch.nn.Module) -> None:
    """After an exception inside a forward or backward (an out-of-memory trial step): FSDP2 keeps
    its per-iteration state otherwise (the root's post-backward callback counted as queued, blocks
    left unsharded with unreduced gradients), and every later step would run on it. torch's
    FSDPModule.reset_iter_state (on the root) waits for in-flight collectives, reshards every
    block and clears that state. Nothing to do for a plain or DDP model."""
    if is_fsdp(model):
        model.reset_iter_state()


def forward_is_collective(model: torch.nn.Module) -> bool:
    """True when every rank must take part in each forward (FSDP gathers the weights), so work
    such as sampling cannot run on rank 0 alone."""
    return is_fsdp(model)


def no_sync(model: torch.nn.Module, last_micro_step: bool):
    """Skip the gradient reduction on every micro-step but the last of an accumulation. Enter it
    around forward and backward both: DDP decides in forward, FSDP2 in backward."""
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


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (clip_grad_norm_'s norm under FSDP) made whole on every rank; other tensors as
    they are. A device-side collective where the DTensor is a partial result: every rank calls it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def host_values(*tensors: torch.Tensor) -> list[float]:
    """The elements of tensors (of any shape, flattened in order) as floats, in one device-to-host
    copy: one sync where one `.item()` each would be as many."""
    return torch.cat([whole(t).detach().float().reshape(-1) for t in tensors]).tolist()


# --------------------------------------------------------------------------- full state
def _resharded(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 leaves the root's weights gathered after a forward without backward (evaluation,
    sampling), registered as plain tensors; state-dict I/O must see the sharded parameters the
    optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors, tied head once: what model.safetensors holds.
    Under FSDP it is a collective (every rank must call it) and only rank 0 gets the tensors."""
    if not is_fsdp(model):
        return model_state_for_saving(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(_resharded(model), options=_full_options(cpu_offload=True))
    skip = TIED if model.tied else None  # an untied head (modern) is saved
    return {k: v.contiguous() for k, v in state.items() if k != skip}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (every rank passes the same dict) into a plain, DDP or FSDP model."""
    if not is_fsdp(model):
        model.load_state_dict(state, strict=False)  # the tied head is stored once
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = dict(state)
    if TIED not in state and "transformer.wte.weight" in state and model.tied:
        state[TIED] = state["transformer.wte.weight"]
    set_model_state_dict(_resharded(model), state, options=_full_options())


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the optimizer's index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() of the whole model (index-keyed, the single-process format).
    Under FSDP a collective; rank 0 gets the full state (others an empty dict)."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(_resharded(model), optimizer, options=_full_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[name]: v for name, v in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]],
    }


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an index-keyed full optimizer state (every rank passes the same dict)."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(_resharded(model), optimizer)
    saved_count = sum(len(g["params"]) for g in state["param_groups"])
    if saved_count != len(names):
        raise GPTForgeError(f"the checkpoint's optimizer has {saved_count} parameters, this model {len(names)}")
    by_name = {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())


def gather_objects(obj, env: DistEnv) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] for a single process."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- loader position
def loader_state(saved, saved_train: dict, env: DistEnv, loader) -> dict:
    """This rank's loader state from a checkpoint's `loader` entry (a list, one per saved rank).

    The position saved is global: (epoch, windows of the epoch handed out by all ranks), the same
    on every rank. So any world size continues from it: rank r of the new world takes its slice
    of each global batch. The batches read are exactly the original run's while the global
    micro-batch world_size * micro_batch_size is unchanged (2 ranks x 4 == 1 process x 8). If it
    changes, they stay the same until the end of the current epoch; after that they can differ,
    because an epoch drops its last num_windows % (global micro-batch) windows (a warning says so).
    """
    states = saved if isinstance(saved, list) else [saved]
    if not states or not all(isinstance(s, dict) for s in states):
        raise GPTForgeError("checkpoint: the data loader state is missing or damaged")
    key = lambda s: tuple(s.get(k) for k in ("epoch", "position", "group", "row", "seed", "order"))  # noqa: E731
    if len({key(s) for s in states}) != 1:
        raise GPTForgeError(f"checkpoint: the {len(states)} ranks saved different data positions "
                            f"{sorted({key(s) for s in states})}; the checkpoint is inconsistent")
    old_micro = (saved_train.get("optim") or {}).get("micro_batch_size")
    if not old_micro:  # `auto`: the size it chose is in the saved config's resolved entry
        old_micro = ((saved_train.get("resolved") or {}).get("micro_batch") or {}).get("size")
    old_global = len(states) * old_micro if isinstance(old_micro, int) else None
    new_global = env.world_size * loader.B
    n = loader.num_windows
    if (env.is_main and loader.bestfit is None and old_global and old_global != new_global  # bestfit's stream ignores the batch
            and n - n % old_global != n - n % new_global):
        import warnings

        warnings.warn(
            f"resuming with a global micro-batch of {new_global} windows ({env.world_size} ranks x {loader.B}) where the "
            f"checkpoint used {old_global} ({len(states)} x {old_micro}): this epoch's batches are the original run's, but "
            f"from the next epoch on each epoch drops {n % new_global} instead of {n % old_global} trailing windows, so "
            "the data order departs from the original run's",
            stacklevel=2,
        )
    return states[0]
