"""The training loop: accumulation, precision, clipping, evaluation, metrics, checkpoints, resume.

What a run is made of (data, tokenizer, weights, wrapping, optimizer, micro-batch) is built by
training/build.py; this module runs it. `train(cfg)` is the whole job; `gptforge train` is a thin
parser over it.

The host reads a step's loss and grad norm when the step logs (every run.log_every-th), before
anything that needs its outcome (an evaluation, a sample, a checkpoint, a stop, the end), and with
the spike guard on, every step before its update (the guard judges it). Other steps leave their
values on the device and are read later, together, in one transfer.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptforge import __version__
from gptforge.checkpoint import WEIGHTS, check_state_matches, load_state_checked
from gptforge.data.shards import data_tokenizer
from gptforge.config import TrainConfig, dials
from gptforge.device import synchronize
from gptforge.errors import GPTForgeError
from gptforge.eval.downstream import evaluate_loop_tasks
from gptforge.eval.hellaswag import download_hellaswag, evaluate_hellaswag
from gptforge.eval.perplexity import evaluate_loss
from gptforge.sampling import generate
from gptforge.tokenizer import N_VOCAB, parse_train
from gptforge.training import checkpoint as ckpt
from gptforge.training import distributed as distrib
from gptforge.training.build import build, saved_dials, wait_for_shards
from gptforge.training.clock import Clock, command_start, max_steps_binds
from gptforge.training.ema import WeightAverage
from gptforge.training.metrics import Peaks, Reporter, device_name
from gptforge.training.optim import describe, lr_at, set_lr
from gptforge.training.spike import SpikeGuard
from gptforge.training.trackers import make_tracker


@dataclass
class TrainResult:
    step: int = 0  # optimizer steps completed
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss
    val_loss: float | None = None
    last_checkpoint: Path | None = None
    stopped: str = "done"  # done | interrupted (Ctrl-C) | terminated (SIGTERM) | time limit (run.max_minutes: the planned end) | dry run
    sample: str = ""


class StopRequest:
    """The first Ctrl-C or SIGTERM: finish the current step, checkpoint and exit cleanly. A second
    signal: abort now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None  # the first one received
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def reason(self) -> str:
        return "interrupted" if self.signal == signal.SIGINT else "terminated"

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.clock = Clock(cfg.run.max_minutes, *command_start())  # run.max_minutes: the schedule's horizon
        binds = max_steps_binds(cfg.explicit, cfg.resolved, cfg.run.max_minutes)
        b = build(cfg, resume, progress)
        if self.clock.on:
            cfg.resolved["max_steps_binds"] = binds
        self.max_steps = cfg.run.max_steps if binds else sys.maxsize
        self.env, self.rt, self.run_dir, self.resume_from = b.env, b.rt, b.run_dir, b.resume_from
        self.tokenizer, self.model, self.train_model, self.seq_len = b.tokenizer, b.model, b.train_model, b.seq_len
        self.optimizer, self.optim, self.scaler, self.head_choice = b.optimizer, b.optim, b.scaler, b.head_choice
        self.micro, self.plan, self.loader, self.val_loader = b.micro, b.plan, b.loader, b.val_loader
        self.dial_lines = b.dial_lines
        self.ema = WeightAverage(self.model, cfg.optim.ema) if cfg.optim.ema else None
        o = cfg.optim
        self.guard = SpikeGuard(o.spike_k, o.spike_window, o.spike_max_skips) if o.spike_guard else None
        self.step, self.lr_scale = 0, 1.0
        self.pending: list[tuple[dict, torch.Tensor]] = []  # rows whose loss and grad norm are on the device
        self.streak_end: dict | None = None  # the row of max_skips spikes in a row, not yet rolled back
        self.val_bpb: float | None = None
        self.hellaswag_path: str | None = None
        if self.resume_from is not None:
            self.restore(self.resume_from)
        wait_for_shards(b.shard_check, self.env, self.rt.device)
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        self.clock.expect(min(cfg.run.eval_tokens or self.val_loader.num_tokens, self.val_loader.num_tokens),
                          self.plan.batch_tokens, cfg.run.sample_tokens if self.samples_here else 0,
                          self.model.num_params() * 4 * 3)  # weights and two moments
        self.peaks = Peaks(self.rt, cfg.run.peak_tflops)
        tracker = None
        if self.env.is_main and cfg.run.log != "none":
            tracker = make_tracker(cfg.run.log, self.run_dir, cfg.record(), cfg.run.project, cfg.run.name or self.run_dir.name)
        self.report = Reporter(self.run_dir, self.env.is_main, self.step, cfg.run.max_steps if binds else None, tracker, progress,
                               resumed=self.resume_from is not None)

    # ----------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        """Step; log the rows read; evaluate, sample, checkpoint when due; stop when asked."""
        cfg, res = self.cfg, TrainResult()
        self.start()
        if self.clock.on:
            self.report.print(f"time budget {self.clock.budget / 60:g} min (run.max_minutes): the schedule runs by the clock, "
                              f"{self.clock.elapsed():.1f} s spent before this step {self.step}; run.max_steps "
                              + ("caps it" if self.max_steps < sys.maxsize else "does not cap it (not given)"))
            self.clock.costs.setdefault("eval", self.eval_probe())  # the reserve's largest part, measured
        rows: list[dict] = []  # rows returned by train_step and not yet logged
        every = lambda n: bool(n) and self.step % n == 0  # noqa: E731
        try:
            with StopRequest() as stop:
                while self.step < self.max_steps:
                    rows.append(self.train_step())
                    done = self.step >= self.max_steps
                    evaluate_now = every(cfg.run.eval_every) and not done
                    hellaswag_now = every(cfg.run.hellaswag_every)
                    sample_now = (every(cfg.run.sample_every) if cfg.run.sample_every else evaluate_now) and not done
                    ckpt_now = every(cfg.run.ckpt_every) and not done
                    stop_now = stop.requested or self.clock.passed()
                    if self.pending and not (done or evaluate_now or hellaswag_now or sample_now or ckpt_now or stop_now):
                        self.report.tick(self.step)
                        continue  # the values stay on the device until something needs them
                    settled = self.log_rows(rows, res)
                    rows = []
                    if not settled:
                        continue  # no evaluation or checkpoint in a spike streak: the weights are suspect
                    if evaluate_now:
                        with self.clock.timing("eval"):
                            res.val_loss = self.evaluate()
                    if hellaswag_now:
                        self.hellaswag()
                    if sample_now and self.samples_here:
                        with self.clock.timing("sample"):
                            self.report.print(f"step {self.step:>6} | sample: {self.sample()!r}")
                    if ckpt_now:
                        with self.clock.timing("checkpoint"):
                            res.last_checkpoint = self.save()
                    if stop_now:
                        res.stopped = stop.reason if stop.requested else "time limit"
                        break
            res.val_loss = self.evaluate()
            res.last_checkpoint = self.save()
            ended = res.stopped in ("done", "time limit")  # a time budget's end is the run's planned end
            if not ended:
                self.report.print(f"stopped ({res.stopped}) after step {self.step}; resume with --resume auto")
            elif res.stopped == "time limit":
                self.report.print(f"time budget reached after step {self.step} ({self.clock.describe()} before the final evaluation)")
            if self.samples_here and ended:
                sample = self.sample()
                res.sample = sample if self.env.is_main else ""
        finally:
            self.report.close()
            self.loader.close()
            self.val_loader.close()
        res.step = self.step
        return res

    def start(self) -> None:
        """The run directory, its config.json and the banner (rank 0)."""
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_run_config(self.run_dir, self.cfg.record())
            self.report.print(self.banner())

    def log_rows(self, rows: list[dict], res: TrainResult) -> bool:
        """Read what is still on the device, then log `rows` (every log_every-th and every skipped
        one) and roll back where a spike streak ended. False when the last step was skipped or the
        run rolled back."""
        self.read_values()
        try:
            for row in rows:
                res.losses[row["step"]] = row["loss"]
                if row["step"] % self.cfg.run.log_every == 0 or row.get("skipped"):
                    self.report.log(row)
                if row.get("skipped"):
                    self.report.print(f"step {row['step']}: update skipped ({row['reason']})")
                if row is self.streak_end:
                    self.streak_end = None
                    self.roll_back(at_step=row["step"] + 1)
                    return False
            return not rows[-1].get("skipped")
        finally:
            self.report.tick(self.step)

    # ----------------------------------------------------------------- one step
    def train_step(self, read: bool | None = None) -> dict:
        """One optimizer step over grad_accum_steps micro-batches; returns its metrics row.

        A logging step (`read`; by default every run.log_every-th) is timed, with the device
        synchronized where the clock is read, and reads its loss and grad norm together with those
        of the steps since the last read. With the spike guard on, every step reads before its
        update. Other steps leave their values on the device (`pending`, read by `read_values`)."""
        cfg, plan = self.cfg, self.plan
        read = self.step % cfg.run.log_every == 0 if read is None else read
        if read:
            synchronize(self.rt.device)
            t0 = time.perf_counter()
        lr = lr_at(self.step, self.optim, cfg.run.max_steps, self.clock.progress()) * self.lr_scale
        group_lrs = set_lr(self.optimizer, lr, self.optim)
        loss, grad_norm = self.forward_backward()
        row = {"step": self.step, "tokens": (self.step + 1) * plan.batch_tokens, "lr": lr}
        if "muon" in group_lrs:
            row["muon_lr"] = group_lrs["muon"]
        self.pending.append((row, torch.stack([loss, grad_norm.float()])))
        if self.guard is not None:
            self.read_values()  # the guard judges this step before its update
        if not row.get("skipped"):
            self.scaler.step(self.optimizer)  # under fp16: skipped by GradScaler on an overflow
            if self.ema is not None:
                self.ema.update(self.step)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if read:
            synchronize(self.rt.device)
            dt = time.perf_counter() - t0
            self.read_values()
            tokens_per_s = plan.batch_tokens / dt
            mfu, mfu_best = self.peaks.mfu(self.flops_per_token * tokens_per_s / self.env.world_size)  # per device
            row.update(dt_ms=dt * 1000, tokens_per_s=tokens_per_s, mfu=mfu, mfu_best=mfu_best)
        self.step += 1
        return row

    def forward_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of this step's batch, accumulated over its micro-batches, unscaled and clipped:
        (the mean loss over ranks, the grad norm before clipping), both 0-dim on the device."""
        plan = self.plan
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
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = distrib.whole(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        distrib.all_reduce_mean(loss_sum, self.env)
        return loss_sum, grad_norm

    def read_values(self) -> list[dict]:
        """Read the pending steps' loss and grad norm in one device-to-host copy and fill in their
        rows; the spike guard judges each (a skipped row gets its reason). A non-finite loss
        without the guard stops the run. Returns the rows read."""
        if not self.pending:
            return []
        rows = [row for row, _ in self.pending]
        values = distrib.host_values(*(v for _, v in self.pending))
        self.pending.clear()
        for i, row in enumerate(rows):
            loss, norm = values[2 * i: 2 * i + 2]
            row.update(loss=loss, grad_norm=norm)
            if self.guard is not None:
                reason = self.guard.observe(loss, norm)
                if reason is not None:
                    row.update(skipped=True, reason=reason, skipped_total=self.guard.skipped_total)
                    if self.guard.must_roll_back:  # the streak ends here: the loop rolls back at this row
                        self.streak_end = row
            elif not math.isfinite(loss):
                raise GPTForgeError(
                    f"loss is {loss} at step {row['step']}; stopping (the last good checkpoint is left as it was; "
                    "lower optim.lr or enable --optim.spike_guard on)"
                )
        return rows

    # ----------------------------------------------------------------- evaluation and samples
    def averaged(self):
        """With optim.ema: the weight average in the model for the block (evaluation, samples,
        the model file of a checkpoint); otherwise the training weights as they are."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def evaluate(self) -> float:
        def loss() -> dict:
            return evaluate_loss(self.model, self.val_loader, self.rt, max_tokens=self.cfg.run.eval_tokens,
                                 token_bytes=self.tokenizer.token_bytes())

        raw = loss() if self.ema is not None else None  # the training weights' too: what averaging gains
        with self.averaged():
            out = loss()
            acc = evaluate_loop_tasks(self.model, self.tokenizer, self.cfg.run.eval_tasks, self.rt) if self.cfg.run.eval_tasks else None
        row = {"step": self.step, "tokens": self.step * self.plan.batch_tokens,
               "val_loss": out["loss"], "val_ppl": out["ppl"], "val_bpb": out["bpb"]}
        line = f"step {self.step:>6} | val loss {out['loss']:.4f} | val ppl {out['ppl']:.2f} | val bpb {out['bpb']:.4f}"
        if raw is not None:
            row.update(val_loss_raw=raw["loss"], val_bpb_raw=raw["bpb"])
            line += f" (ema; the training weights' {raw['bpb']:.4f})"
        self.report.log(row)
        self.report.print(line)
        self.val_bpb = out["bpb"]
        if acc is not None:  # downstream accuracy beside the loss
            self.report.log({"step": self.step, "tokens": self.step * self.plan.batch_tokens, **acc})
            self.report.print(f"step {self.step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in acc.items()))
        return out["loss"]

    def eval_probe(self) -> float:
        """Seconds an evaluation of run.eval_tokens takes, from one validation batch timed (after
        one untimed: warm-up); logs nothing. For the time budget's reserve (training/clock.py)."""
        val, batch = self.val_loader, self.val_loader.B * self.val_loader.T
        for _ in range(2):
            t0 = time.perf_counter()
            evaluate_loss(self.model, val, self.rt, max_tokens=batch)
            seconds = time.perf_counter() - t0
        return seconds * min(self.cfg.run.eval_tokens or val.num_tokens, val.num_tokens) / batch

    def hellaswag(self) -> None:
        if self.hellaswag_path is None:  # the configured file, else the official one (downloaded once)
            self.hellaswag_path = self.cfg.run.hellaswag_path or str(download_hellaswag())
        with self.averaged():
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
        tok, prompt = self.tokenizer, self.cfg.run.sample_prompt if prompt is None else prompt
        with self.averaged():
            ids = generate(self.model, tok.encode(prompt) or [tok.eot_id], max_new_tokens=self.cfg.run.sample_tokens,
                           temperature=0.8, top_k=50, seed=self.cfg.run.seed, runtime=self.rt)
        return prompt + tok.decode(ids)

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
        weights = load_state_checked(path / WEIGHTS, self.model)
        if self.ema is not None:  # the average is what the checkpoint's model file holds
            distrib.load_model_state(self.model, weights)
            self.ema.reset()
        if state.get("train_weights") is not None:  # saved with optim.ema: training goes on from these
            check_state_matches(state["train_weights"], self.model, f"{path / ckpt.STATE} (train_weights)")
            weights = state["train_weights"]
        distrib.load_model_state(self.model, weights)
        distrib.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(distrib.loader_state(state["loader"], saved_train, self.env, self.loader))
        if self.guard is not None and state.get("spike_guard"):
            self.guard.load_state_dict(state["spike_guard"])
        self.step, self.lr_scale = int(state["step"]), float(state.get("lr_scale", 1.0))
        self.clock.load_state_dict(state.get("clock"))  # the time already spent (not on a rollback)
        ckpt.restore_rng(state["rng"], self.env.rank, self.env.world_size, self.rt.device)  # each rank its own

    def train_state(self) -> dict:
        assert not self.pending, "the steps' values must be read before a save"
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
            **({"clock": self.clock.state_dict()} if self.clock.on else {}),
            "gptforge_version": __version__,
        }

    def save(self) -> Path | None:
        state = self.train_state()  # collective under torchrun: every rank takes part
        model_state = distrib.full_model_state(self.model)  # likewise under FSDP
        if self.ema is not None:  # the model file holds the average; state.pt the weights to resume from
            state["train_weights"] = model_state
            with self.ema.applied():  # copies: a plain model's state dict shares the parameters' storage
                model_state = {k: v.clone() for k, v in distrib.full_model_state(self.model).items()}
        if not self.env.is_main:
            distrib.barrier(self.env)
            return None
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, model_state,
                                    state, self.cfg.record(), self.cfg.run.keep_last, tokenizer=self.tokenizer)
        distrib.barrier(self.env)
        return path

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

    # ----------------------------------------------------------------- the banner
    def banner(self) -> str:
        c, p, m = self.cfg, self.plan, self.model
        lines = [
            f"gptforge {__version__} | torch {torch.__version__} | device {self.rt.device} ({device_name(self.rt.device)}) "
            f"| precision {self.rt.precision}" + (f" ({self.rt.chosen_by})" if self.rt.chosen_by else "")
            + f" | world size {self.env.world_size} | compile {c.run.compile}",
            f"model {c.model.init_from or c.model.preset}: {m.num_params() / 1e6:.2f}M parameters, {m.config}",
            f"batch {p.batch_tokens} tokens = {p.micro_batch_size} seqs x {p.seq_len} tokens x {p.world_size} ranks x {p.grad_accum_steps} accumulation steps",
            f"micro-batch {p.micro_batch_size}: {self.micro.reason}"
            + (" | activation checkpointing on" if c.run.activation_checkpointing else ""),
            f"weights: {self.weights_line()}",
            f"data {self.loader.num_tokens:,} train tokens ({self.loader.num_windows:,} windows), {self.val_loader.num_tokens:,} val tokens"
            + (f" | {self.loader.bestfit.stats().line()}" if self.loader.bestfit is not None else "")
            + f" | tokenizer {self.tokenizer.name} ({self.tokenizer.vocab_size:,} ids)"
            + (" (less than one batch: evaluated whole, as one smaller batch)" if self.val_loader.short else ""),
            f"{self.peaks.line()} | run dir {self.run_dir}"
            + (f" | resumed from {self.resume_from} at step {self.step}" if self.resume_from else ""),
            f"LM-head loss {self.head_choice.describe()}",
            describe(self.optimizer, c.optim) + f" | schedule {self.optim.schedule}"
            + (f" | ema {c.optim.ema:g} (evaluation, samples and checkpoints' model files use the average)" if self.ema else ""),
        ]
        lines += [f"dial {line}" for line in self.dial_lines]
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

    @property
    def peak(self) -> float:
        """The MFU denominator of the precision in use, FLOP/s."""
        return self.peaks.peak

    @property
    def best_peak(self) -> float:
        """The MFU denominator of the device's best dtype, FLOP/s."""
        return self.peaks.best


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> TrainResult:
    from gptforge.training import preflight, rundir

    if cfg.run.dry_run:
        text = dry_run(cfg, resume)
        if distrib.DistEnv.from_env().is_main:  # under torchrun, rank 0 speaks
            print(text, flush=True)
        return TrainResult(stopped="dry run")
    ready = preflight.check(cfg)  # what the loop needs later, found before step 0
    with rundir.owned(cfg, resume):  # the run dir is this run's, and locked, until the run ends
        trainer = Trainer(cfg, resume=resume, progress=progress)
        trainer.hellaswag_path = ready.hellaswag_path
        try:
            result = trainer.run()
        except BaseException:
            distrib.shutdown(trainer.env, clean=False)
            raise
    distrib.shutdown(trainer.env)
    return result


def dry_run(cfg: TrainConfig, resume: str | None = None) -> str:
    """run.dry_run: the model and every derived value, from the config alone (the vocabulary from
    data.tokenizer, or data.dir's manifest): no data prepared, no weights, nothing written."""
    vocab = data_tokenizer(cfg.data.dir).vocab_size if cfg.data.dir else parse_train(cfg.data.tokenizer) or N_VOCAB
    resume_from = ckpt.resolve_resume(resume, Path(cfg.run.dir)) if resume else None
    return dials.preview(cfg, vocab, distrib.DistEnv.from_env().world_size, saved=saved_dials(resume_from))
