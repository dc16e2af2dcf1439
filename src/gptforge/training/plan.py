"""A run's plan, decided from its config and the model as built: the batch arithmetic (tokens per
step = micro-batch x seq_len x ranks x accumulation steps, worked out once, with a clear error when
they do not divide) and the optimizer and LR schedule that `auto` stands for.

`auto` is the architecture's own choice: Muon and a warmup-stable-decay schedule for the modern
recipe, AdamW and cosine for GPT-2 (docs/config.md says how these were chosen).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.config import TrainConfig
from gptforge.errors import GPTForgeError


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic, worked out once: tokens per step = micro_batch * seq_len * world * accum."""

    batch_tokens: int
    micro_batch_size: int
    seq_len: int
    world_size: int
    grad_accum_steps: int

    @classmethod
    def make(cls, batch_tokens: int, micro_batch_size: int, seq_len: int, world_size: int = 1) -> "BatchPlan":
        per_micro = micro_batch_size * seq_len * world_size
        if batch_tokens % per_micro:
            raise GPTForgeError(
                f"optim.batch_tokens ({batch_tokens}) must be a multiple of micro_batch_size * seq_len * world_size "
                f"= {micro_batch_size} * {seq_len} * {world_size} = {per_micro}"
            )
        return cls(batch_tokens, micro_batch_size, seq_len, world_size, batch_tokens // per_micro)


def per_rank_sequences(batch_tokens: int, seq_len: int, world_size: int = 1) -> int:
    """Sequences each rank processes per optimizer step: batch_tokens / (seq_len * world_size)."""
    if batch_tokens % (seq_len * world_size):
        raise GPTForgeError(
            f"optim.batch_tokens ({batch_tokens}) must be a multiple of seq_len * world_size "
            f"= {seq_len} * {world_size} = {seq_len * world_size}"
        )
    return batch_tokens // (seq_len * world_size)


def seq_len_of(cfg: TrainConfig) -> int:
    """Tokens per sequence as configured: data.seq_len, or the model's block_size."""
    return cfg.data.seq_len or cfg.model.gpt_config().block_size


def optimizer_name(cfg: TrainConfig, arch: str | None = None) -> str:
    """The optimizer this run uses: optim.name, where `auto` is the architecture's own (muon for
    the modern recipe, adamw for GPT-2). `arch`: the model's as built (with model.init_from it is
    the source's, which the config may not say)."""
    return _by_arch(cfg.optim.name, cfg, arch, modern="muon", gpt2="adamw")


def schedule_name(cfg: TrainConfig, arch: str | None = None) -> str:
    """The LR schedule this run uses: optim.schedule, where `auto` is the architecture's own (wsd
    for the modern recipe, cosine for GPT-2). `arch` as in optimizer_name."""
    return _by_arch(cfg.optim.schedule, cfg, arch, modern="wsd", gpt2="cosine")


def _by_arch(value: str, cfg: TrainConfig, arch: str | None, modern: str, gpt2: str) -> str:
    """`value`, or for `auto` the architecture's own choice (arch: the built model's, else the config's)."""
    if value != "auto":
        return value
    return modern if (arch or cfg.model.arch) == "modern" else gpt2
