"""`optim.micro_batch_size auto`: the largest micro-batch that divides the per-rank batch and fits.

The per-rank batch is batch_tokens / (seq_len * world_size) sequences; the candidates are its
divisors, largest first, so gradient accumulation keeps batch_tokens exact.

CUDA: a real forward + backward + optimizer step at the candidate size (random tokens, the
training model as wrapped, the training loss path; eager even under run.compile), taken when its
peak (the allocator's reserved bytes) leaves at least `HEADROOM` of the device's memory free:
the trial is one uncompiled step, and the run needs more besides (compile workspaces, NCCL
buffers, fragmentation over many steps, evaluation). On out-of-memory (also as cuBLAS's or NCCL's
RuntimeError) or a peak over the margin, the memory is freed (and FSDP2's per-iteration state
reset) and the next candidate (the largest divisor at most half the failed size) is tried.
Afterwards the weights, the optimizer (fresh again) and every RNG are exactly as before: the
trials change nothing the run starts from.

CPU (and MPS): a budget of `RAM_FRACTION` of the available RAM (psutil; shared by the ranks of
this machine), against the optimizer's and gradients' memory still to come plus a measured
per-sequence footprint: the bytes autograd saves for backward in one training forward of one
sequence (counted with saved-tensor hooks), times `BACKWARD_FACTOR` for what backward adds.

Under torchrun every rank decides and the smallest choice wins, so all ranks agree.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import psutil
import torch

from gptforge.errors import GPTForgeError
from gptforge.training import checkpoint as ckpt
from gptforge.training import distributed as distrib
from gptforge.training.plan import per_rank_sequences

RAM_FRACTION = 0.6  # of the RAM available at start: the OS, the data loader and others need the rest
BACKWARD_FACTOR = 2.0  # peak memory per sequence / bytes saved for backward (activation grads, transients)
HEADROOM = 0.10  # of the GPU's memory a trial step must leave free (see the module doc)
# the messages of allocator failures that reach Python as a plain RuntimeError, not OutOfMemoryError
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")
GiB = 1024**3


@dataclass(frozen=True)
class MicroBatch:
    size: int
    reason: str  # why this size: printed in the banner, saved in the run's config
    world_size: int

    def record(self) -> dict:
        return {"size": self.size, "reason": self.reason, "world_size": self.world_size}


def candidates(per_rank: int) -> list[int]:
    """Divisors of per_rank, largest first, each at most half the one before (halving on OOM)."""
    out = [per_rank]
    while out[-1] > 1:
        out.append(max(d for d in range(1, out[-1] // 2 + 1) if per_rank % d == 0))
    return out


def choose(cfg, model, train_model, optimizer, rt, env, seq_len: int,
           saved: dict | None = None) -> MicroBatch:
    """The micro-batch of this run: the configured one, the one a resumed run chose at the same
    world size (`saved`, from its checkpoint), or a new choice for `auto`."""
    size = cfg.optim.micro_batch_size
    if size > 0:
        return MicroBatch(size, "set in the config", env.world_size)
    per_rank = per_rank_sequences(cfg.optim.batch_tokens, seq_len, env.world_size)
    if saved and saved.get("world_size") == env.world_size and isinstance(saved.get("size"), int) \
            and per_rank % saved["size"] == 0:
        return MicroBatch(saved["size"], f"auto, as chosen when the run began ({saved.get('reason', '')})", env.world_size)
    memory = device_memory(rt.device)
    if memory is not None:
        size, why = _fit_trials(model, train_model, optimizer, rt, env, seq_len, per_rank, memory)
    else:
        size, why = _fit_ram(model, train_model, rt, env, seq_len, per_rank)
    return MicroBatch(size, f"auto: {why}", env.world_size)


def _agree(value: int, env) -> int:
    """The smallest value over all ranks (every rank must call it)."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device="cuda" if torch.cuda.is_available() and
                     torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


def _batch(model, b: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)  # its own generator: the global RNGs are not touched
    x = torch.randint(0, model.config.vocab_size, (b, seq_len + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor: this rank's shard


def _no_collectives(train_model):
    """DDP's backward without the all-reduce (an OOM on one rank must not strand the others in
    one). FSDP's per-block all-gathers cannot be skipped; its ranks are symmetric."""
    return train_model.no_sync() if hasattr(train_model, "no_sync") else contextlib.nullcontext()


def _too_big(model, seq_len: int, device_memory: str) -> GPTForgeError:
    n = model.num_params() / 1e6
    return GPTForgeError(
        f"optim.micro_batch_size auto: the model ({n:.1f}M parameters, {model.config.n_layer} layers x "
        f"{model.config.n_embd}) does not fit even one sequence of seq_len {seq_len} on {device_memory}; "
        "try --run.activation_checkpointing true, shard it over GPUs with torchrun --run.dist fsdp, "
        "or a shorter --data.seq_len"
    )


class CudaMemory:
    """What the trial steps ask of a CUDA device's memory (tests substitute a simulated one)."""

    def __init__(self, device: torch.device):
        self.device = device

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device)

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        """Bytes the caching allocator held at most since reset_peak: what the process took from
        the GPU, fragmentation included (the CUDA context aside)."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def device_memory(device: torch.device) -> CudaMemory | None:
    """The memory of a device where micro-batch auto runs trial steps (CUDA); None where it
    budgets the RAM instead."""
    return CudaMemory(device) if device.type == "cuda" else None


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or an allocator failure that cuBLAS, cuDNN or NCCL report as a
    RuntimeError ("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate", "NCCL ... 'out of memory'")."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(m.lower() in text for m in OOM_MARKERS)


def _fit_trials(model, train_model, optimizer, rt, env, seq_len, per_rank, memory) -> tuple[int, str]:
    total = memory.total()
    limit = int(total * (1 - HEADROOM))
    saved_weights = [_local(p).detach().to("cpu", copy=True) for p in model.parameters()]
    rng = ckpt.rng_state(rt.device)
    tried, chosen, peak = [], 0, 0  # tried: (size, its peak or None for out of memory)
    for b in candidates(per_rank):
        fits, peak = _trial_step(model, train_model, optimizer, rt, b, seq_len, memory)
        ok = _agree(int(fits and peak <= limit), env)
        tried.append((b, peak if fits else None))
        if ok:
            chosen = b
            break
    # not in a `finally`: after any other error the run ends, and FSDP's state is not to be trusted
    with torch.no_grad():
        for p, w in zip(model.parameters(), saved_weights):
            _local(p).copy_(w)
    optimizer.state.clear()  # fresh again: no moments, no step count
    optimizer.zero_grad(set_to_none=True)
    ckpt.set_rng_state(rng, rt.device)
    memory.release()
    memory.reset_peak()
    name = f"{memory.name()} ({total / GiB:.1f} GiB)"
    if not chosen:
        raise _too_big(model, seq_len, name + f" with {HEADROOM:.0%} of it kept free")
    why = (f"a trial step of {chosen} x {seq_len} tokens peaked at {peak / GiB:.1f} of {total / GiB:.1f} GiB, "
           f"keeping at least {HEADROOM:.0%} free for compile workspaces, NCCL buffers, fragmentation and evaluation")
    failed = [f"{b} ran out of memory" if p is None else f"{b} peaked at {p / GiB:.1f} GiB, over {1 - HEADROOM:.0%}"
              for b, p in tried if b != chosen]
    if failed:
        why += f" ({'; '.join(failed)})"
    return chosen, why + (f"; the per-rank batch is {per_rank}" if chosen == per_rank else "")


def _trial_step(model, train_model, optimizer, rt, b, seq_len, memory) -> tuple[bool, int]:
    """One forward + backward + optimizer step at micro-batch b, eager (the stance overrides a
    compiled train_model or compiled blocks); (ran without running out of memory, peak bytes)."""
    memory.reset_peak()
    oom = False
    train_model.train()
    try:
        with torch.compiler.set_stance("force_eager"):
            x, y = _batch(model, b, seq_len, rt.device)
            with _no_collectives(train_model), rt.autocast():
                _, loss = train_model(x, y)
            loss.backward()
            optimizer.step()
        del x, y, loss
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        oom = True  # freed below, outside the except clause (its traceback holds the tensors)
    peak = memory.peak()
    if oom:
        distrib.reset_after_abort(model)  # FSDP2: reshard, clear the aborted iteration's state
    optimizer.zero_grad(set_to_none=True)
    memory.release()
    return not oom, peak


def saved_bytes_per_sequence(model, train_model, rt, seq_len: int) -> int:
    """Bytes autograd keeps for backward in one training forward of one sequence (parameters,
    which exist anyway, not counted; each storage counted once)."""
    params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
    # under FSDP the forward saves the gathered (unsharded) weights: not activations either
    gathered = {tuple(p.shape) for p in model.parameters()} if distrib.is_fsdp(model) else set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and tuple(t.shape) not in gathered:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    x, y = _batch(model, 1, seq_len, rt.device)
    rng, was_training = ckpt.rng_state(rt.device), train_model.training  # dropout must not move the run's RNG
    try:
        train_model.train()  # as in training: dropout keeps its masks
        with torch.compiler.set_stance("force_eager"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                rt.autocast():  # eager: FSDP's blocks may be compiled
            _, loss = train_model(x, y)
        del loss  # no backward: the graph is dropped
    finally:
        ckpt.set_rng_state(rng, rt.device)
        train_model.train(was_training)
    return sum(seen.values())


def available_ram() -> int:
    return psutil.virtual_memory().available


def _fit_ram(model, train_model, rt, env, seq_len, per_rank) -> tuple[int, str]:
    # the raw model: a forward without backward must not leave DDP/FSDP expecting one
    per_seq = int(saved_bytes_per_sequence(model, model, rt, seq_len) * BACKWARD_FACTOR)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))  # processes sharing this RAM
    shard = env.world_size if distrib.is_fsdp(model) else 1
    param_bytes = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    to_come = 3 * param_bytes // shard  # gradients and AdamW's two moments, not allocated yet
    available = available_ram()
    budget = int(available * RAM_FRACTION / local_ranks) - to_come
    fits = [b for b in candidates(per_rank) if b * per_seq <= budget]
    chosen = _agree(fits[0] if fits else 0, env)
    if not chosen:
        raise _too_big(model, seq_len, f"the CPU ({available / GiB:.1f} GiB RAM available)")
    why = (f"{per_seq / 2**20:.0f} MiB per sequence of {seq_len} tokens (measured), a budget of "
           f"{max(budget, 0) / GiB:.1f} GiB ({RAM_FRACTION:.0%} of {available / GiB:.1f} GiB available"
           + (f" / {local_ranks} ranks" if local_ranks > 1 else "") + ", less optimizer and gradients)")
    if chosen == per_rank:
        why += f"; the whole per-rank batch of {per_rank}"
    return chosen, why
