"""The loss-spike guard: its statistics, and the trainer skipping, counting and rolling back.

Faults injected in-process: a corrupted batch (targets replaced by one rare token id, inputs by
noise) and an absurd learning rate from a patched schedule.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from gptforge import config as C
from gptforge.training import checkpoint as ckpt
from gptforge.training import trainer as trainer_mod
from gptforge.training.spike import SpikeGuard
from gptforge.training.trainer import Trainer

from .conftest import NANO, metrics_rows


# ------------------------------------------------------------------------------ the statistics


def test_no_decision_before_half_a_window_except_non_finite():
    g = SpikeGuard(k=3.0, window=8, max_skips=3)
    for v in (10.0, 1e6, 3.0):  # wild values, but only 0..3 steps of history: accepted
        assert g.observe(v, 1.0) is None
    assert list(g.losses) == [10.0, 1e6, 3.0]
    assert g.observe(float("nan"), 1.0) == "loss is nan"
    assert g.observe(1.0, float("inf")) == "grad norm is inf"
    assert g.skipped_total == 2 and g.consecutive == 2 and len(g.losses) == 3


def test_limit_is_mean_plus_k_sample_std():
    g = SpikeGuard(k=2.0, window=8, max_skips=3)
    for v in (1.0, 2.0, 3.0, 4.0):
        assert g.observe(v, 1.0 + v / 100) is None
    mean = 2.5
    std = math.sqrt(sum((v - mean) ** 2 for v in (1.0, 2.0, 3.0, 4.0)) / 3)  # sample std (n - 1)
    limit = mean + 2.0 * std
    assert g.is_spike(limit - 1e-9, 1.02) is None
    reason = g.is_spike(limit + 1e-6, 1.02)
    assert reason is not None and reason.startswith("loss ") and f"{limit:.4g}" in reason
    # the grad norm has its own statistics
    norms = [1.01, 1.02, 1.03, 1.04]
    nmean = sum(norms) / 4
    nlimit = nmean + 2.0 * math.sqrt(sum((v - nmean) ** 2 for v in norms) / 3)
    assert g.is_spike(2.0, nlimit - 1e-9) is None
    assert g.is_spike(2.0, nlimit + 1e-6).startswith("grad norm ")


def test_flat_history_has_a_floor_on_the_spread():
    g = SpikeGuard(k=6.0, window=4, max_skips=3)
    for _ in range(4):
        g.observe(5.0, 1.0)
    # std is 0: the spread is taken as 1e-3 * |mean|, so the limit is 5 + 6 * 0.005 = 5.03
    assert g.is_spike(5.02, 1.0) is None
    assert g.is_spike(5.04, 1.0) is not None


def test_skips_stay_out_of_history_and_count():
    g = SpikeGuard(k=3.0, window=6, max_skips=3)
    for v in (4.0, 4.1, 3.9, 4.0):
        g.observe(v, 1.0)
    before = list(g.losses)
    assert g.observe(40.0, 1.0) is not None and g.observe(41.0, 1.0) is not None
    assert list(g.losses) == before  # a spike never raises the bar for the next one
    assert g.consecutive == 2 and not g.must_roll_back
    assert g.observe(4.05, 1.0) is None
    assert g.consecutive == 0 and g.skipped_total == 2
    for v in (50.0, 51.0, 52.0):
        assert g.observe(v, 1.0) is not None
    assert g.must_roll_back and g.consecutive == 3 and g.skipped_total == 5


def test_history_is_a_sliding_window():
    g = SpikeGuard(k=3.0, window=4, max_skips=3)
    for v in (100.0, 100.0, 1.0, 1.0, 1.0, 1.0):
        g.observe(v, 1.0)
    assert list(g.losses) == [1.0, 1.0, 1.0, 1.0]
    assert g.is_spike(2.0, 1.0) is not None  # the old 100s no longer widen the spread


def test_state_round_trips_through_a_weights_only_checkpoint():
    g = SpikeGuard(k=3.0, window=6, max_skips=3)
    for v in (4.0, 4.2, 3.8, 4.1, 30.0):
        g.observe(v, 0.5 + v / 100)
    buf = io.BytesIO()
    torch.save({"spike_guard": g.state_dict()}, buf)
    buf.seek(0)
    h = SpikeGuard(k=3.0, window=6, max_skips=3)
    h.load_state_dict(torch.load(buf, weights_only=True)["spike_guard"])
    assert h.state_dict() == g.state_dict()
    for v in (4.05, 9.0, 4.0, 25.0):
        assert h.observe(v, 0.55) == g.observe(v, 0.55)


# ------------------------------------------------------------------------------ in the trainer


def guarded_cfg(run_dir, data_dir, **overrides) -> C.TrainConfig:
    d = dict(NANO)
    d.update({"data.dir": str(data_dir), "run.dir": str(run_dir), "optim.spike_guard": "on",
              "optim.spike_k": "6", "optim.spike_window": "8", "optim.spike_max_skips": "3"})
    d.update({k: str(v) for k, v in overrides.items()})
    return C.resolve(None, list(d.items()))


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


class StepLog(list):
    """Per train step, its metrics row and whether any parameter or AdamW's step count changed.
    The rows are the trainer's own dicts: a step between reads gets its values when the host
    reads them, so look after the run (`rows()`)."""

    def rows(self) -> list[dict]:
        return [{**row, **flags} for row, flags in self]


def watch_steps(trainer: Trainer, monkeypatch) -> StepLog:
    log = StepLog()
    real = trainer.train_step

    def step():
        before = params_of(trainer.model)
        adam_steps = [s.get("step") for s in trainer.optimizer.state.values()]
        row = real()
        after = params_of(trainer.model)
        changed = any(not torch.equal(before[k], after[k]) for k in before)
        same_adam = [s.get("step") for s in trainer.optimizer.state.values()] == adam_steps
        log.append((row, {"changed": changed, "same_adam": same_adam}))
        return row

    monkeypatch.setattr(trainer, "train_step", step)
    return log


def test_corrupted_batch_is_skipped_without_update(tmp_path, shards_dir, monkeypatch):
    run = tmp_path / "run"
    # k = 4 over 8 steps: by step 18 nano's loss is ~7 +- 0.5; garbage costs ~log(50257) = 10.8
    trainer = Trainer(guarded_cfg(run, shards_dir, **{"run.max_steps": 22, "run.ckpt_every": 6, "optim.spike_k": 4}),
                      progress=False)
    bad_step = 18
    real_next = trainer.loader.next_batch

    def next_batch():
        x, y = real_next()
        if trainer.step == bad_step:  # garbage in: random ids in, one rare token id as every target
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 50257, x.shape, generator=g, dtype=x.dtype)
            y = torch.full_like(y, 47123)
        return x, y

    monkeypatch.setattr(trainer.loader, "next_batch", next_batch)
    log = watch_steps(trainer, monkeypatch)
    res = trainer.run()
    log = log.rows()

    assert res.step == 22
    by_step = {r["step"]: r for r in log}
    bad = by_step[bad_step]
    assert bad.get("skipped") is True, bad
    assert "loss" in bad["reason"] or "grad norm" in bad["reason"]
    assert not bad["changed"] and bad["same_adam"], "a skipped step must not touch the parameters or AdamW"
    for s, r in by_step.items():
        if s != bad_step:
            assert not r.get("skipped") and r["changed"], f"step {s} should be a normal update: {r}"
    rows = [r for r in metrics_rows(run) if r.get("skipped")]
    assert [r["step"] for r in rows] == [bad_step] and rows[0]["reason"] == bad["reason"]
    assert rows[0]["skipped_total"] == 1  # the running count, in metrics.jsonl
    assert trainer.guard.skipped_total == 1 and trainer.guard.consecutive == 0
    # counted in the checkpoint too: a resumed run keeps the count
    state = torch.load(ckpt.latest_checkpoint(run) / ckpt.STATE, weights_only=True)
    assert state["spike_guard"]["skipped_total"] == 1
    assert all(math.isfinite(v) for v in res.losses.values())


def test_absurd_lr_rolls_back_with_a_smaller_lr(tmp_path, shards_dir, monkeypatch):
    """From step 6 the schedule says lr x 1e5; the guard skips, rolls back to step_000006 with the
    LR scaled by spike_lr_factor (1e-5 here: back to sane), and the run finishes with finite losses."""
    run = tmp_path / "run"
    real_lr_at = trainer_mod.lr_at
    monkeypatch.setattr(trainer_mod, "lr_at", lambda step, args, max_steps, progress=None: real_lr_at(step, args, max_steps, progress) * (1e5 if step >= 6 else 1))
    cfg = guarded_cfg(run, shards_dir, **{"run.max_steps": 14, "run.ckpt_every": 3, "optim.spike_window": "6",
                                          "optim.spike_lr_factor": "1e-5"})
    trainer = Trainer(cfg, progress=False)
    log = watch_steps(trainer, monkeypatch)
    res = trainer.run()
    log = log.rows()

    rows = metrics_rows(run)
    events = [r for r in rows if r.get("event") == "rollback"]
    assert len(events) == 1, events
    ev = events[0]
    assert ev["step"] == 6 and ev["checkpoint"].endswith("step_000006") and ev["lr_scale"] == pytest.approx(1e-5)
    skipped = [r for r in log if r.get("skipped")]
    assert [r["step"] for r in skipped] == [7, 8, 9]  # step 6 itself looks fine; its update is the blow-up
    assert all(not r["changed"] and r["same_adam"] for r in skipped)
    assert [r["skipped_total"] for r in rows if r.get("skipped")] == [1, 2, 3]
    # after the rollback: steps 6.. again, at lr * 1e5 * 1e-5, to the end, all finite
    after = log[log.index(skipped[-1]) + 1:]
    assert [r["step"] for r in after] == list(range(6, 14))
    assert all(not r.get("skipped") and math.isfinite(r["loss"]) for r in after)
    assert all(r["lr"] == pytest.approx(real_lr_at(r["step"], trainer.optim, 14)) for r in after)
    assert res.step == 14 and math.isfinite(res.val_loss)
    assert trainer.lr_scale == pytest.approx(1e-5) and trainer.guard.skipped_total == 3
    # the rollback and the smaller LR survive a resume: both are in the final checkpoint
    state = torch.load(ckpt.latest_checkpoint(run) / ckpt.STATE, weights_only=True)
    assert state["lr_scale"] == pytest.approx(1e-5) and state["spike_guard"]["skipped_total"] == 3


def test_repeated_spikes_without_a_checkpoint_stop_cleanly(tmp_path, shards_dir, monkeypatch):
    from gptforge.errors import GPTForgeError

    run = tmp_path / "run"
    real_lr_at = trainer_mod.lr_at
    monkeypatch.setattr(trainer_mod, "lr_at", lambda step, args, max_steps, progress=None: real_lr_at(step, args, max_steps, progress) * (1e5 if step >= 4 else 1))
    trainer = Trainer(guarded_cfg(run, shards_dir, **{"run.max_steps": 12, "run.ckpt_every": 0,
                                                      "optim.spike_window": "4"}), progress=False)
    with pytest.raises(GPTForgeError, match=r"consecutive loss spikes at step \d+ and no checkpoint to roll back to"):
        trainer.run()
    assert ckpt.list_checkpoints(run) == []


def test_log_every_changes_nothing_the_guard_does(tmp_path, shards_dir, monkeypatch):
    """Fused AdamW, log_every 5 against 1: with the guard on the host reads every step before its
    update whatever log_every says, so a user sees the same skipped steps (7..9) and reasons, the
    same rollback, the same losses and final weights, bitwise; only the rows logged differ."""
    real_lr_at = trainer_mod.lr_at
    monkeypatch.setattr(trainer_mod, "lr_at", lambda step, args, max_steps, progress=None: real_lr_at(step, args, max_steps, progress) * (1e5 if step >= 6 else 1))
    runs = {}
    for log_every in (1, 5):
        run = tmp_path / f"log{log_every}"
        cfg = guarded_cfg(run, shards_dir, **{"run.max_steps": 12, "run.ckpt_every": 6, "optim.spike_window": "6",
                                              "optim.spike_lr_factor": "1e-5", "optim.fused": "on",
                                              "run.log_every": log_every})
        trainer = Trainer(cfg, progress=False)
        log = watch_steps(trainer, monkeypatch)
        res = trainer.run()
        runs[log_every] = (run, res, log.rows(), trainer)
    (run1, res1, log1, t1), (run5, res5, log5, t5) = runs[1], runs[5]
    assert [r["step"] for r in log5 if r.get("skipped")] == [r["step"] for r in log1 if r.get("skipped")] == [7, 8, 9]
    skipped = lambda rows: [(r["step"], r["reason"], r["skipped_total"]) for r in rows if r.get("skipped")]  # noqa: E731
    assert skipped(metrics_rows(run5)) == skipped(metrics_rows(run1))
    events = lambda rows: [{k: v for k, v in r.items() if k != "checkpoint"} for r in rows if "event" in r]  # noqa: E731
    assert events(metrics_rows(run5)) == events(metrics_rows(run1)) and len(events(metrics_rows(run1))) == 1
    assert all(not r["changed"] and r["same_adam"] for r in log5 if r.get("skipped"))
    assert res5.losses == res1.losses and sorted(res5.losses) == list(range(12))  # bitwise, every step
    assert res5.val_loss == res1.val_loss
    assert all(torch.equal(a, b) for a, b in zip(t5.model.parameters(), t1.model.parameters()))
    assert t5.guard.state_dict() == t1.guard.state_dict() and t5.lr_scale == t1.lr_scale
    logged = [r["step"] for r in metrics_rows(run5) if "loss" in r and not r.get("skipped")]
    assert logged == [0, 5, 10], logged  # before the rollback 0 and 5; after it, from step 6: 10
