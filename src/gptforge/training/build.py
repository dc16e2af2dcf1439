"""Building a run: everything the loop needs, made once, in the order each part needs the others.

process group and device -> data (embedded corpus prepared, shards verified in the background) ->
tokenizer -> the dials (config.dials: size, rates, horizon, batch) -> weights (random init,
--resume's architecture, or model.init_from) -> wrapping (DDP / FSDP2, compile, activation checkpointing) -> optimizer and schedule -> LM-head loss path ->
micro-batch -> batch plan -> loaders. `build(cfg, resume)` returns them as `Parts`; the trainer
restores a checkpoint into them and runs the loop.

Everything the model must not know (device, autocast, compile, DDP/FSDP) is applied here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gptforge.config import OptimArgs, TrainConfig, dials
from gptforge.data import verify
from gptforge.data.loader import ShardLoader
from gptforge.data.prepare import ensure_default_corpus
from gptforge.data.shards import data_tokenizer
from gptforge.device import Runtime, refuse_cpu_fallback, seed_everything, set_matmul_precision
from gptforge.loss import HeadLoss
from gptforge.measure import LMHeadChoice, choose_lm_head_loss
from gptforge.tokenizer import Tokenizer
from gptforge.training import checkpoint as ckpt
from gptforge.training import distributed as distrib
from gptforge.training import fit, weights
from gptforge.training.optim import make_optimizer
from gptforge.training.plan import BatchPlan, optimizer_name, per_rank_sequences, schedule_name


@dataclass
class Parts:
    """What a run is made of, as built (see the module doc for the order)."""

    env: distrib.DistEnv
    rt: Runtime
    run_dir: Path
    resume_from: Path | None  # the checkpoint to restore, if any
    tokenizer: Tokenizer  # the data's: the model's vocabulary, the samples' text, bits per byte
    model: torch.nn.Module  # the raw module: saved, evaluated, sampled
    train_model: torch.nn.Module  # the module as wrapped (and compiled) for training
    seq_len: int
    optimizer: torch.optim.Optimizer
    optim: OptimArgs  # cfg.optim with `auto` resolved
    head_choice: LMHeadChoice
    micro: fit.MicroBatch
    plan: BatchPlan
    loader: ShardLoader
    val_loader: ShardLoader
    scaler: torch.amp.GradScaler
    shard_check: verify.ShardCheck  # running in the background: wait_for_shards before the first step
    dial_lines: list[str]  # the banner's account of the derived values (config.dials)


def build(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> Parts:
    """Every part of a run, built from its config (`resume`: a checkpoint or run dir, or `auto`).
    Records in cfg.resolved what it decided (tokenizer, weights, micro-batch)."""
    env, rt = start_process(cfg)
    run_dir = Path(cfg.run.dir)
    resume_from = ckpt.resolve_resume(resume, run_dir) if resume else None
    seed_everything(cfg.run.seed)  # the same on every rank: the initial weights are drawn from it

    data_dir = resolve_data_dir(cfg, env)
    shard_check = verify.start(data_dir, enabled=cfg.data.verify, hashes_here=env.local_rank == 0,
                               progress=progress and env.is_main)  # hashes while the model is built
    tokenizer = data_tokenizer(data_dir)
    cfg.resolved["tokenizer"] = tokenizer.identity()
    dial_lines = dials.derive(cfg, tokenizer.vocab_size, env.world_size, saved=saved_dials(resume_from))  # before anything they size
    model, cfg.resolved["weights"] = weights.initial_model(cfg, resume_from, env, tokenizer, f"data {data_dir}")
    refuse_cpu_fallback(cfg.run.device, rt.device, model.num_params(non_embedding=True))
    seed_everything(cfg.run.seed + env.rank)  # then ranks apart: each its own dropout masks (the data
    #                                           order has its own seed, the same on every rank)
    model = model.to(rt.device)
    seq_len = weights.seq_len_for(cfg, model.config)
    head_choice = choose_head_loss(cfg, model, rt, env, seq_len)  # before the micro-batch, whose trials run it
    # wrapped (and compiled: under FSDP2 block by block, before sharding) before the optimizer is
    # built: FSDP2 replaces the parameters by their shards
    train_model = distrib.wrap(model, env, rt.device, cfg.run.dist, compile=cfg.run.compile,
                               activation_checkpointing=cfg.run.activation_checkpointing,
                               head_loss=HeadLoss(head_choice.path, head_choice.rows, head_choice.block_rows,
                                                  compiled=head_choice.compiled))
    optimizer, optim = make_optimizer_for(cfg, model, rt.device)
    saved_micro = (ckpt.checkpoint_meta(resume_from)[1].get("resolved") or {}).get("micro_batch") if resume_from else None
    micro = fit.choose(cfg, model, train_model, optimizer, rt, env, seq_len, saved=saved_micro)
    cfg.resolved["micro_batch"] = micro.record()
    plan = BatchPlan.make(cfg.optim.batch_tokens, micro.size, seq_len, env.world_size)
    loader, val_loader = make_loaders(cfg, data_dir, env, rt, micro.size, seq_len, model.config.vocab_size)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
    return Parts(env, rt, run_dir, resume_from, tokenizer, model, train_model, seq_len, optimizer, optim,
                 head_choice, micro, plan, loader, val_loader, scaler, shard_check, dial_lines)


def saved_dials(resume_from: Path | None) -> dict | None:
    """The dials' record of the checkpoint a run resumes (its horizon, batch and rates), if any."""
    if resume_from is None:
        return None
    return (ckpt.checkpoint_meta(resume_from)[1].get("resolved") or {}).get(dials.RECORD) or None


def start_process(cfg: TrainConfig) -> tuple[distrib.DistEnv, Runtime]:
    """The process group (under torchrun) and this rank's device and precision."""
    env = distrib.DistEnv.from_env()
    rt = Runtime.make(distrib.device_for(env, cfg.run.device), cfg.run.precision)
    distrib.init(env, rt.device)
    if env.enabled and cfg.run.precision == "auto":  # one decision for all ranks: rank 0's probe
        choice = [rt.precision, rt.chosen_by]
        torch.distributed.broadcast_object_list(choice, src=0)
        rt = Runtime(rt.device, *choice)
        set_matmul_precision(rt.precision)
    return env, rt


def resolve_data_dir(cfg: TrainConfig, env: distrib.DistEnv) -> Path:
    """The configured shard directory, or the embedded corpus (prepared once, by rank 0)."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    if env.is_main:
        path = ensure_default_corpus(tokenizer=cfg.data.tokenizer)
    distrib.barrier(env)
    if not env.is_main:
        path = ensure_default_corpus(tokenizer=cfg.data.tokenizer)
    return path


def make_optimizer_for(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> tuple[torch.optim.Optimizer, OptimArgs]:
    """The optimizer over the (wrapped) model's parameters, and cfg.optim with its schedule resolved;
    `auto` by the model's own architecture (with model.init_from, the source's)."""
    arch = model.config.recipe
    optimizer = make_optimizer(model, cfg.optim, device, optimizer_name(cfg, arch))
    return optimizer, replace(cfg.optim, schedule=schedule_name(cfg, arch))


def choose_head_loss(cfg: TrainConfig, model: torch.nn.Module, rt: Runtime, env: distrib.DistEnv, seq_len: int) -> LMHeadChoice:
    """The LM-head loss path of this run, which `distrib.wrap` gives the model: the fused head + loss (chunked: no
    (B, T, V) logits, see loss.LinearCrossEntropy) or the plain logits + cross_entropy, compiled or
    eager, with row chunks sized per device (the rule is measure.choose_lm_head_loss). With
    micro-batch auto the rows are the per-rank batch's."""
    sequences = cfg.optim.micro_batch_size or per_rank_sequences(cfg.optim.batch_tokens, seq_len, env.world_size)
    h = choose_lm_head_loss(cfg.run.lm_head_loss, rt.device, cfg.run.compile, sequences * seq_len,
                            model.config.padded_vocab_size, rt.precision, micro_auto=not cfg.optim.micro_batch_size)
    return h


def make_loaders(cfg: TrainConfig, data_dir: Path, env: distrib.DistEnv, rt: Runtime, batch_size: int, seq_len: int,
                 vocab_size: int) -> tuple[ShardLoader, ShardLoader]:
    """The train loader (this rank's part of each global batch) and the validation loader."""
    common = dict(batch_size=batch_size, seq_len=seq_len, rank=env.rank, world_size=env.world_size,
                  device=str(rt.device), vocab_size=vocab_size)
    train = ShardLoader(data_dir, split="train", order=cfg.data.order, seed=cfg.run.seed, prefetch=cfg.data.prefetch,
                        packing=cfg.data.packing, **common)
    val = ShardLoader(data_dir, split="val", order="sequential", seed=0, prefetch=0, allow_short=True, **common)
    return train, val


def wait_for_shards(check: verify.ShardCheck, env: distrib.DistEnv, device: torch.device) -> None:
    """Join the background shard verification; under torchrun every rank stops on a bad shard."""
    agree = None
    if env.enabled:
        agree = lambda ok: distrib.all_reduce_mean(torch.tensor(float(ok), device=device), env).item() == 1.0  # noqa: E731
    check.wait(agree=agree)
