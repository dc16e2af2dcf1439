"""The training loop: accumulation, precision, clipping, evaluation, metrics, checkpoints, resume.

Everything the model must not know (device, autocast, compile, DDP/FSDP) is applied here, once.
`train(cfg)` is the whole job; `gptforge train` is a thin parser over it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gptforge import __version__
from gptforge.checkpoint import WEIGHTS, load_state_checked
from gptforge.config import BatchPlan, TrainConfig, optimizer_name, per_rank_sequences, refuse_fsdp_muon, schedule_name
from gptforge.device import Runtime, refuse_cpu_fallback, seed_everything, set_matmul_precision, synchronize
from gptforge.errors import GPTForgeError
from gptforge.loss import HeadLoss
from gptforge.measure import best_peak_tflops, choose_lm_head_loss, cpu_matmul_rates, peak_tflops
from gptforge.training import checkpoint as ckpt
from gptforge.training import distributed as distrib
from gptforge.training.metrics import Reporter
from gptforge.training.optim import describe, lr_at, make_optimizer, set_lr
from gptforge.training.spike import SpikeGuard


@dataclass
class TrainResult:
    step: int = 0  # optimizer steps completed
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss
    val_loss: float | None = None
    last_checkpoint: Path | None = None
    stopped: str = "done"  # done | interrupted | time limit
    sample: str = ""


class StopRequest:
    """First Ctrl-C: finish the current step, checkpoint and exit cleanly. Second: abort now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def resolve_data_dir(cfg: TrainConfig, env: distrib.DistEnv) -> Path:
    """The configured shard directory, or the embedded corpus (prepared once, by rank 0)."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    from gptforge.data.prepare import ensure_default_corpus

    if env.is_main:
        path = ensure_default_corpus(tokenizer=cfg.data.tokenizer)
    distrib.barrier(env)
    if not env.is_main:
        path = ensure_default_corpus(tokenizer=cfg.data.tokenizer)
    return path


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> bool:
    """optimizer.step(), skipped on the device where `skip` (a 0-dim bool tensor) is true: the way
    GradScaler hands its found_inf to an optimizer that takes one (fused AdamW: the kernel leaves
    the weights and moments as they are and the step count is put back), so no sync. Returns False,
    having done nothing, for an optimizer that cannot (for-each or single-tensor AdamW)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    optimizer.found_inf, optimizer.grad_scale = skip.float(), None
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale
    return True


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.env = distrib.DistEnv.from_env()
        self.rt = Runtime.make(distrib.device_for(self.env, cfg.run.device), cfg.run.precision)
        distrib.init(self.env, self.rt.device)
        if self.env.enabled and cfg.run.precision == "auto":  # one decision for all ranks: rank 0's probe
            choice = [self.rt.precision, self.rt.chosen_by]
            torch.distributed.broadcast_object_list(choice, src=0)
            self.rt = Runtime(self.rt.device, *choice)
            set_matmul_precision(self.rt.precision)
        self.run_dir = Path(cfg.run.dir)
        self.resume_from = ckpt.resolve_resume(resume, self.run_dir) if resume else None
        seed_everything(cfg.run.seed)  # the same on every rank: the initial weights are drawn from it

        from gptforge.data.loader import ShardLoader
        from gptforge.training import fit, weights

        data_dir = resolve_data_dir(cfg, self.env)
        from gptforge.data import verify  # hashes in the background while the model is built

        shard_check = verify.start(data_dir, enabled=cfg.data.verify, hashes_here=self.env.local_rank == 0,
                                   progress=progress and self.env.is_main)
        from gptforge.data.shards import data_tokenizer

        # the data's tokenizer: the model's vocabulary, the samples' text, bits per byte; into every checkpoint
        self.tokenizer = data_tokenizer(data_dir)
        cfg.resolved["tokenizer"] = self.tokenizer.identity()
        # random init, --resume's architecture, or model.init_from: one place (train/weights.py)
        model, cfg.resolved["weights"] = weights.initial_model(cfg, self.resume_from, self.env, self.tokenizer,
                                                               f"data {data_dir}")
        refuse_cpu_fallback(cfg.run.device, self.rt.device, model.num_params(non_embedding=True))
        seed_everything(cfg.run.seed + self.env.rank)  # then ranks apart: each its own dropout masks (the data
        #                                                order has its own seed, the same on every rank)
        self.model = model.to(self.rt.device)  # the raw module: saved, evaluated, sampled
        gpt_config = self.model.config
        self.seq_len = weights.seq_len_for(cfg, gpt_config)
        # The fused LM-head + loss (chunked: no (B, T, V) logits, see loss.LinearCrossEntropy) or
        # the plain logits + cross_entropy, compiled or eager, with row chunks sized per device:
        # the rule is measure.choose_lm_head_loss. Decided before the micro-batch, whose trials
        # must run the same path; with micro-batch auto the rows are the per-rank batch's.
        sequences = cfg.optim.micro_batch_size or per_rank_sequences(cfg.optim.batch_tokens, self.seq_len, self.env.world_size)
        h = self.head_choice = choose_lm_head_loss(
            cfg.run.lm_head_loss, self.rt.device, cfg.run.compile, sequences * self.seq_len, gpt_config.padded_vocab_size,
            self.rt.precision, micro_auto=not cfg.optim.micro_batch_size)
        # wrapped (and compiled: under FSDP2 block by block, before sharding) before the optimizer
        # is built: FSDP2 replaces the parameters by their shards
        self.train_model = distrib.wrap(self.model, self.env, self.rt.device, cfg.run.dist,
                                        activation_checkpointing=cfg.run.activation_checkpointing,
                                        compile=cfg.run.compile,
                                        head_loss=HeadLoss(h.path, h.rows, h.block_rows, compiled=h.compiled))
        arch = gpt_config.recipe  # the model's own (init_from: the source's)
        refusal = refuse_fsdp_muon(cfg, arch)
        if refusal:
            raise GPTForgeError(refusal)
        self.optimizer = make_optimizer(self.model, cfg.optim, self.rt.device, optimizer_name(cfg, arch))
        self.optim = replace(cfg.optim, schedule=schedule_name(cfg, arch))  # auto resolved
        saved_micro = None
        if self.resume_from is not None:  # auto re-derives only if the world size changed
            saved_micro = (ckpt.checkpoint_meta(self.resume_from)[1].get("resolved") or {}).get("micro_batch")
        self.micro = fit.choose(cfg, self.model, self.train_model, self.optimizer, self.rt, self.env, self.seq_len,
                                saved=saved_micro)
        cfg.resolved["micro_batch"] = self.micro.record()
        self.plan = BatchPlan.make(cfg.optim.batch_tokens, self.micro.size, self.seq_len, self.env.world_size)
        common = dict(batch_size=self.micro.size, seq_len=self.seq_len, rank=self.env.rank,
                      world_size=self.env.world_size, device=str(self.rt.device), vocab_size=gpt_config.vocab_size)
        self.loader = ShardLoader(data_dir, split="train", order=cfg.data.order, seed=cfg.run.seed,
                                  prefetch=cfg.data.prefetch, **common)
        self.val_loader = ShardLoader(data_dir, split="val", order="sequential", seed=0, prefetch=0, allow_short=True, **common)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.rt.precision == "fp16")
        self.guard = SpikeGuard(cfg.optim.spike_k, cfg.optim.spike_window, cfg.optim.spike_max_skips) if cfg.optim.spike_guard else None
        self.step, self.lr_scale = 0, 1.0
        self.queued: list[tuple[dict, torch.Tensor]] = []  # steps whose values the host has not read
        self.halted = torch.zeros((), dtype=torch.bool, device=self.rt.device)  # a non-finite loss was queued
        self.streak_end: dict | None = None  # the row of max_skips spikes in a row, read and not yet rolled back
        self.val_bpb: float | None = None
        self.hellaswag_path: str | None = None
        if self.resume_from is not None:
            self.restore(self.resume_from)
        shard_check.wait(agree=None if not self.env.enabled else lambda ok: distrib.all_reduce_mean(
            torch.tensor(float(ok), device=self.rt.device), self.env).item() == 1.0)  # every rank stops on a bad shard
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        # MFU against the peak of the precision in use; mfu_best against the device's best dtype
        self.peak = peak_tflops(self.rt.device, self.rt.precision, cfg.run.peak_tflops) * 1e12
        best, self.best_dtype = best_peak_tflops(self.rt.device, cfg.run.peak_tflops)
        self.best_peak = max(best * 1e12, self.peak)
        self.peaks_remeasured = False
        self.tracker = None
        if self.env.is_main and cfg.run.log != "none":
            from gptforge.training.trackers import make_tracker

            self.tracker = make_tracker(cfg.run.log, self.run_dir, cfg.record(), cfg.run.project, cfg.run.name or self.run_dir.name)
        self.report = Reporter(self.run_dir, self.env.is_main, self.step, cfg.run.max_steps, self.tracker, progress)

    # ----------------------------------------------------------------- state
    def restore(self, path: Path) -> None:
        """Load weights, optimizer, scaler, schedule, RNGs and loader position of a checkpoint."""
        saved_model, saved_train = ckpt.checkpoint_meta(path)
        if saved_model.to_dict() | {"attention": None} != self.model.config.to_dict() | {"attention": None}:
            raise GPTForgeError(
                f"{path}: checkpoint architecture {saved_model} differs from the configured {self.model.config}"
            )
        state = ckpt.load_train_state(path)
        saved_kinds = [g.get("kind") for g in state["optimizer"].get("param_groups", [])]
        kinds = [g.get("kind") for g in self.optimizer.param_groups]
        if saved_kinds != kinds:  # MuonAdamW's groups are tagged with their kind, plain AdamW's not
            was, now = ("muon" if any(k) else "adamw" for k in (saved_kinds, kinds))
            raise GPTForgeError(f"{path}: the checkpoint's optimizer is {was} (groups {saved_kinds}), this run's is {now} "
                                f"(groups {kinds}): resume with --optim.name {was}, or start anew from its weights "
                                "with --model.init_from")
        distrib.load_model_state(self.model, load_state_checked(path / WEIGHTS, self.model))
        distrib.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(distrib.loader_state(state["loader"], saved_train, self.env, self.loader))
        if self.guard is not None and state.get("spike_guard"):
            self.guard.load_state_dict(state["spike_guard"])
        self.step, self.lr_scale = int(state["step"]), float(state.get("lr_scale", 1.0))
        ckpt.restore_rng(state["rng"], self.env.rank, self.env.world_size, self.rt.device)  # each rank its own

    def train_state(self) -> dict:
        assert not self.queued, "the steps queued must be read (and the spike guard caught up) before a save"
        loader_states = [self.loader.state_dict()]
        if self.env.enabled:  # every rank's position, so any world size can resume
            gathered = [None] * self.env.world_size
            torch.distributed.all_gather_object(gathered, loader_states[0])
            loader_states = gathered
        return {
            "step": self.step,
            "optimizer": distrib.full_optimizer_state(self.model, self.optimizer),  # collective under FSDP
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": distrib.gather_objects(ckpt.rng_state(self.rt.device), self.env),  # one per rank
            "loader": loader_states,
            "spike_guard": self.guard.state_dict() if self.guard is not None else None,
            "lr_scale": self.lr_scale,
            "gptforge_version": __version__,
        }

    def save(self) -> Path | None:
        state = self.train_state()  # collective under torchrun: every rank takes part
        model_state = distrib.full_model_state(self.model)  # likewise under FSDP
        if not self.env.is_main:
            distrib.barrier(self.env)
            return None
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, model_state,
                                    state, self.cfg.record(), self.cfg.run.keep_last, tokenizer=self.tokenizer)
        distrib.barrier(self.env)
        return path

    # ----------------------------------------------------------------- steps
    def train_step(self, read: bool | None = None) -> dict:
        """Queue one optimizer step over grad_accum_steps micro-batches; return its metrics row.

        The host reads the device only on a logging step (`read`; by default every
        run.log_every-th): that step is timed, with the device synchronized where the clock is
        read, and reads its loss and grad norm together with those of the steps queued since the
        last read, in one transfer (`read_values`), which fills in their rows. Other steps leave
        them on the device: whether an update is skipped (a non-finite loss, the spike guard) is
        decided there and masks the optimizer step (`step_unless`). An optimizer that cannot
        take that mask makes the host read each step before its update instead."""
        cfg, plan = self.cfg, self.plan
        read = self.step % cfg.run.log_every == 0 if read is None else read
        if read:
            synchronize(self.rt.device)
            t0 = time.perf_counter()
        lr = lr_at(self.step, self.optim, cfg.run.max_steps) * self.lr_scale
        group_lrs = set_lr(self.optimizer, lr, self.optim)
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.rt.device)
        for micro in range(plan.grad_accum_steps):
            x, y = self.loader.next_batch()
            # backward inside too: DDP decides in forward whether to reduce, FSDP2 in backward
            with distrib.no_sync(self.train_model, micro == plan.grad_accum_steps - 1):
                with self.rt.autocast():
                    _, loss = self.train_model(x, y)
                    loss = loss / plan.grad_accum_steps  # the mean over micro-batches, not the sum
                loss_sum += loss.detach()
                self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = distrib.whole(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        distrib.all_reduce_mean(loss_sum, self.env)
        skip, halted = self.verdict(loss_sum, grad_norm)
        row = {"step": self.step, "tokens": (self.step + 1) * plan.batch_tokens, "lr": lr}
        if "muon" in group_lrs:
            row["muon_lr"] = group_lrs["muon"]
        self.queued.append((row, torch.stack([loss_sum, grad_norm.float(), skip.float(), halted.float()])))
        if not step_unless(self.optimizer, skip):  # the device could not decide: the host does
            if any(r is row and applied for r, applied in self.read_values()):
                self.optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if read:
            synchronize(self.rt.device)
            dt = time.perf_counter() - t0
            self.read_values()
            tokens_per_s = plan.batch_tokens / dt
            flops_per_s = self.flops_per_token * tokens_per_s / self.env.world_size  # per device
            if flops_per_s > self.peak and self.rt.device.type == "cpu" and not cfg.run.peak_tflops and not self.peaks_remeasured:
                self.remeasure_peaks()  # the cached probe was taken on a busy machine: once a run, ~0.3 s
            row.update(dt_ms=dt * 1000, tokens_per_s=tokens_per_s, mfu=flops_per_s / self.peak, mfu_best=flops_per_s / self.best_peak)
        self.step += 1
        return row

    def verdict(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip, halted): whether this step's update is skipped, and whether an earlier queued
        step already stopped the run (a non-finite loss without the guard, a streak of spikes with
        it), so that no later update lands before the host reads it. 0-dim bools on the device."""
        if self.guard is not None:  # a non-finite loss or grad norm is a spike
            skip, halted = self.guard.decide(loss, grad_norm)
        else:
            halted = self.halted
            skip = halted | ~torch.isfinite(loss)
            self.halted = skip
        if self.scaler.is_enabled():  # fp16: GradScaler's own skip of an overflowing step (found_inf)
            skip = skip | ~torch.isfinite(grad_norm)
        return skip, halted

    def read_values(self) -> list[tuple[dict, bool]]:
        """Read the queued steps' values in one device-to-host copy and fill in their rows (loss,
        grad norm; the spike guard's reason for a skipped one). Returns (row, update applied) per
        step. Steps queued behind one that stopped the run are dropped (`discarded`): their
        updates were masked and they count for nothing, since the run rolls back or ends there.
        A non-finite loss without the guard is the error it always was."""
        if not self.queued:
            return []
        values = distrib.host_values(*(v for _, v in self.queued))
        out = []
        for i, (row, _) in enumerate(self.queued):
            loss, norm, skip, halted = values[4 * i: 4 * i + 4]
            if halted:
                row["discarded"] = True
                continue
            row.update(loss=loss, grad_norm=norm)
            if self.guard is not None:
                reason = self.guard.record(loss, norm, skipped=bool(skip))
                if reason is not None:
                    row.update(skipped=True, reason=reason, skipped_total=self.guard.skipped_total)
                    if self.guard.must_roll_back:  # the streak ends here: the loop rolls back at this row
                        self.streak_end = row
            elif not math.isfinite(loss):
                self.queued.clear()
                raise GPTForgeError(
                    f"loss is {loss} at step {row['step']}; stopping (the last good checkpoint is left as it was; "
                    "lower optim.lr or enable --optim.spike_guard on)"
                )
            out.append((row, not skip))
        self.queued.clear()
        return out

    def evaluate(self) -> float:
        from gptforge.eval.perplexity import evaluate_loss

        out = evaluate_loss(self.model, self.val_loader, self.rt, max_tokens=self.cfg.run.eval_tokens,
                            token_bytes=self.tokenizer.token_bytes())
        self.report.log({"step": self.step, "tokens": self.step * self.plan.batch_tokens,
                         "val_loss": out["loss"], "val_ppl": out["ppl"], "val_bpb": out["bpb"]})
        self.report.print(f"step {self.step:>6} | val loss {out['loss']:.4f} | val ppl {out['ppl']:.2f} | val bpb {out['bpb']:.4f}")
        self.val_bpb = out["bpb"]
        return out["loss"]

    def hellaswag(self) -> None:
        from gptforge.eval.hellaswag import evaluate_hellaswag

        if self.hellaswag_path is None:  # the configured file, else the official one (downloaded once)
            from gptforge.eval.hellaswag import download_hellaswag

            self.hellaswag_path = self.cfg.run.hellaswag_path or str(download_hellaswag())
        out = evaluate_hellaswag(self.model, self.hellaswag_path, self.rt, tokenizer=self.tokenizer)
        self.report.log({"step": self.step, "tokens": self.step * self.plan.batch_tokens,
                         "hellaswag_acc": out["acc"], "hellaswag_acc_norm": out["acc_norm"]})
        self.report.print(f"step {self.step:>6} | hellaswag acc {out['acc']:.4f} acc_norm {out['acc_norm']:.4f}")

    @property
    def samples_here(self) -> bool:
        """Rank 0 samples; under FSDP every rank runs the forwards with it (they gather weights).
        With run.sample_tokens 0 nobody does: no sample mid-run nor at the end."""
        if self.cfg.run.sample_tokens == 0:
            return False
        return self.env.is_main or distrib.forward_is_collective(self.model)

    def sample(self, prompt: str | None = None) -> str:
        """The prompt (run.sample_prompt) and its continuation by the model, as text."""
        from gptforge.sampling import generate

        tok, prompt = self.tokenizer, self.cfg.run.sample_prompt if prompt is None else prompt
        ids = generate(self.model, tok.encode(prompt) or [tok.eot_id], max_new_tokens=self.cfg.run.sample_tokens,
                       temperature=0.8, top_k=50, seed=self.cfg.run.seed, runtime=self.rt)
        return prompt + tok.decode(ids)

    def roll_back(self, at_step: int) -> None:
        """After repeated spikes (the streak ended with step `at_step - 1`): back to the last
        checkpoint, with a smaller learning rate."""
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            raise GPTForgeError(
                f"{self.guard.consecutive} consecutive loss spikes at step {at_step} and no checkpoint to roll back to"
            )
        scale = self.lr_scale * self.cfg.optim.spike_lr_factor
        skipped = self.guard.skipped_total
        self.restore(latest)
        self.lr_scale = scale
        self.guard.reset_streak(skipped)
        self.report.log({"step": self.step, "event": "rollback", "checkpoint": str(latest), "lr_scale": scale})
        self.report.print(f"rolled back to {latest.name} after repeated spikes; learning rate now x{scale:g}")

    # ----------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        """The loop. Rows are handled when the host has read them: at every logging step, and
        before anything that needs the step's outcome (an evaluation, a sample, a checkpoint, a
        stop, the end). So a skipped step, a rollback or a non-finite loss between logging steps
        is acted on there, with the same result: the masked updates left the weights as they were
        at the skipped or failing step, and nothing queued behind it counts."""
        cfg, res = self.cfg, TrainResult()
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_run_config(self.run_dir, cfg.record())
            self.report.print(self.banner())
        start_time = time.time()
        timed_out = lambda: bool(cfg.run.max_minutes) and time.time() - start_time > cfg.run.max_minutes * 60  # noqa: E731
        unhandled: list[dict] = []  # rows returned by train_step that the loop has not acted on
        try:
            with StopRequest() as stop:
                while self.step < cfg.run.max_steps:
                    unhandled.append(self.train_step())
                    done = self.step >= cfg.run.max_steps
                    evaluated = bool(cfg.run.eval_every) and self.step % cfg.run.eval_every == 0 and not done
                    hellaswag_now = bool(cfg.run.hellaswag_every) and self.step % cfg.run.hellaswag_every == 0
                    sample_now = (self.step % cfg.run.sample_every == 0 if cfg.run.sample_every else evaluated) and not done
                    ckpt_now = bool(cfg.run.ckpt_every) and self.step % cfg.run.ckpt_every == 0 and not done
                    if self.queued:  # values still on the device: read them only if something needs them now
                        if not (done or evaluated or hellaswag_now or sample_now or ckpt_now or stop.requested or timed_out()):
                            self.report.tick(self.step)
                            continue
                        self.read_values()
                    rows, unhandled = unhandled, []
                    rolled_back = False
                    for row in rows:
                        assert not row.get("discarded"), "a step queued behind a stop was not dropped"
                        res.losses[row["step"]] = row["loss"]
                        if row["step"] % cfg.run.log_every == 0 or row.get("skipped"):
                            self.report.log(row)
                        if row.get("skipped"):
                            self.report.print(f"step {row['step']}: update skipped ({row['reason']})")
                        if row is self.streak_end:
                            self.streak_end = None
                            self.roll_back(at_step=row["step"] + 1)  # the steps queued behind are dropped
                            rolled_back = True
                            break
                    self.report.tick(self.step)
                    if rolled_back or rows[-1].get("skipped"):
                        continue  # no eval or checkpoint in a spike streak: the weights are suspect
                    if evaluated:
                        res.val_loss = self.evaluate()
                    if hellaswag_now:
                        self.hellaswag()
                    if sample_now and self.samples_here:
                        sample = self.sample()
                        self.report.print(f"step {self.step:>6} | sample: {sample!r}")
                    if ckpt_now:
                        res.last_checkpoint = self.save()
                    if stop.requested or timed_out():
                        res.stopped = "interrupted" if stop.requested else "time limit"
                        break
            res.val_loss = self.evaluate()
            res.last_checkpoint = self.save()
            if res.stopped != "done":
                self.report.print(f"stopped ({res.stopped}) after step {self.step}; resume with --resume auto")
            if self.samples_here and res.stopped == "done":
                sample = self.sample()
                res.sample = sample if self.env.is_main else ""
        finally:
            self.report.close()
            self.loader.close()
            self.val_loader.close()
        res.step = self.step
        return res

    def banner(self) -> str:
        c, p, m = self.cfg, self.plan, self.model
        lines = [
            f"gptforge {__version__} | torch {torch.__version__} | device {self.rt.device} ({self.device_name()}) | precision {self.rt.precision}"
            + (f" ({self.rt.chosen_by})" if self.rt.chosen_by else "") + f" | world size {self.env.world_size} | compile {c.run.compile}",
            f"model {c.model.init_from or c.model.preset}: {m.num_params() / 1e6:.2f}M parameters, {m.config}",
            f"batch {p.batch_tokens} tokens = {p.micro_batch_size} seqs x {p.seq_len} tokens x {p.world_size} ranks x {p.grad_accum_steps} accumulation steps",
            f"micro-batch {p.micro_batch_size}: {self.micro.reason}"
            + (" | activation checkpointing on" if c.run.activation_checkpointing else ""),
            f"weights: {self.weights_line()}",
            f"data {self.loader.num_tokens:,} train tokens ({self.loader.num_windows:,} windows), {self.val_loader.num_tokens:,} val tokens"
            + f" | tokenizer {self.tokenizer.name} ({self.tokenizer.vocab_size:,} ids)"
            + (" (less than one batch: evaluated whole, as one smaller batch)" if self.val_loader.short else ""),
            f"{self.mfu_line()} | run dir {self.run_dir}"
            + (f" | resumed from {self.resume_from} at step {self.step}" if self.resume_from else ""),
            f"LM-head loss {self.head_choice.describe()}",
            describe(self.optimizer, c.optim) + f" | schedule {self.optim.schedule}",
        ]
        return "\n".join(lines)

    def weights_line(self) -> str:
        w = self.cfg.resolved.get("weights", {})
        if w.get("from") == "init_from":
            crop = w.get("cropped_block_size")
            return f"init_from {w['source']} ({w['path']})" + (f", block_size cropped {crop[0]} -> {crop[1]}" if crop else "")
        if w.get("from") == "resume":
            began = w.get("run_began_from") or {}
            return f"resumed from {w['checkpoint']}" + (f" (the run began from {began['source']})" if began.get("source") else "")
        return f"random init (seed {self.cfg.run.seed})"

    def remeasure_peaks(self) -> None:
        self.peaks_remeasured = True
        cpu_matmul_rates(refresh=True)
        self.peak = max(self.peak, peak_tflops(self.rt.device, self.rt.precision) * 1e12)
        best, self.best_dtype = best_peak_tflops(self.rt.device)
        self.best_peak = max(best * 1e12, self.peak)

    def mfu_line(self) -> str:
        """The two MFU denominators, as the banner states them (see the README's definitions)."""
        return (f"MFU peak {self.rt.precision} {self.peak / 1e12:.3f} TFLOP/s; device best "
                f"{self.best_dtype} {self.best_peak / 1e12:.3f} TFLOP/s (mfu_best)")

    def device_name(self) -> str:
        if self.rt.device.type == "cuda":
            return torch.cuda.get_device_name(self.rt.device)
        return f"{torch.get_num_threads()} CPU threads"


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> TrainResult:
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        result = trainer.run()
    except BaseException:
        distrib.shutdown(trainer.env, clean=False)
        raise
    distrib.shutdown(trainer.env)
    return result
