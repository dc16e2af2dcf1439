"""run.max_minutes: the LR schedule keyed to the clock, a run that ends on time at the floor, a
resumed run that continues the clock; without a budget the schedule is by steps, as it was."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from gptforge import config as C
from gptforge.config import OptimArgs
from gptforge.training import checkpoint as ckpt
from gptforge.training.clock import Clock, max_steps_binds
from gptforge.training.optim import lr_at, lr_by_progress
from gptforge.training.trainer import train


def test_wsd_by_time_is_flat_then_linear_to_the_floor():
    args = OptimArgs(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, decay_frac=0.2, schedule="wsd")
    assert lr_by_progress(0.0, args) == lr_by_progress(0.79, args) == 1.0  # the plateau
    assert lr_by_progress(0.9, args) == pytest.approx(0.55)  # half way down the decay
    assert lr_by_progress(1.0, args) == lr_by_progress(1.7, args) == 1.0 * 0.1  # the floor, exactly
    lrs = [lr_by_progress(p / 100, args) for p in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # warmup stays in steps, and a budget spent within it still ends at the floor
    assert lr_at(0, args, 100, progress=0.0) == pytest.approx(0.1)
    assert lr_at(5, args, 100, progress=0.5) == pytest.approx(0.6)
    assert lr_at(5, args, 100, progress=1.0) == 0.1
    assert lr_at(50, args, 100, progress=0.5) == 1.0  # the steps no longer decide


def test_cosine_by_time():
    args = OptimArgs(lr=1.0, min_lr_ratio=0.1, warmup_steps=0, schedule="cosine")
    assert lr_by_progress(0.0, args) == 1.0
    assert lr_by_progress(0.5, args) == pytest.approx(0.55)
    assert lr_by_progress(1.0, args) == 0.1


def _lr_at_by_steps(step: int, args: OptimArgs, max_steps: int) -> float:
    """lr_at as it is without a time budget (a copy): the default run's schedule must not change."""
    max_lr, min_lr = args.lr, args.lr * args.min_lr_ratio
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


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
@pytest.mark.parametrize("decay_steps", [0, 300])
def test_without_a_budget_the_schedule_is_by_steps_bit_for_bit(schedule, decay_steps):
    args = OptimArgs(lr=2e-3, min_lr_ratio=0.1, warmup_steps=20, decay_steps=decay_steps, schedule=schedule)
    for step in range(0, 600):
        assert lr_at(step, args, 550) == lr_at(step, args, 550, None) == _lr_at_by_steps(step, args, 550)
    clock = Clock(0.0)
    assert not clock.on and clock.progress() is None and not clock.passed()


def test_clock_horizon_reserve_and_state():
    now = [100.0]
    clock = Clock(1.0, started=100.0, exit_s=1.0, timer=lambda: now[0])  # 60 s from t = 100
    clock.expect(eval_tokens=3000, batch_tokens=1000, sample_tokens=100, checkpoint_bytes=int(2e8))
    assert clock.progress() == 0.0  # no step measured: reserve = sample 1 s + checkpoint 1 s + exit 1 s
    now[0] = 102.0
    # a step takes 2 s; the eval (3000 tokens at a third of a trained token's cost) one step's
    assert clock.progress() == pytest.approx(2 / (60 - 5 - 2))
    assert clock.reserve() == pytest.approx(2 + 1 + 1 + 1)
    with clock.timing("eval"):
        now[0] += 4.0  # measured: the reserve takes it over the estimate
    assert clock.reserve() == pytest.approx(4 + 1 + 1 + 1)
    for t in range(108, 152, 2):
        now[0] = float(t)
        assert clock.progress() < 1 and not clock.passed()
    now[0] = 152.0  # median step 2 s: the horizon is 60 - 7 - 2 = 51 s
    assert clock.progress() >= 1 and clock.passed()
    state = clock.state_dict()
    assert state["spent_s"] == pytest.approx(52.0) and state["costs"] == {"eval": 4.0}
    # a resumed process continues the clock
    later = Clock(1.0, started=500.0, timer=lambda: 503.0)
    later.load_state_dict(state)
    assert later.elapsed() == pytest.approx(55.0) and later.costs == {"eval": 4.0}
    later.progress()
    later.load_state_dict({"spent_s": 0.0})  # a rollback's restore mid-run: the clock runs on
    assert later.elapsed() == pytest.approx(55.0)


def test_max_steps_binds_only_when_given():
    assert max_steps_binds(set(), {}, 0.0)
    assert not max_steps_binds(set(), {}, 2.0)
    assert max_steps_binds({"run.max_steps"}, {}, 2.0)
    assert not max_steps_binds({"run.max_steps"}, {"max_steps_binds": False}, 2.0)  # the run's first decision


def nano_cfg(run_dir: Path, data_dir: Path, **overrides) -> C.TrainConfig:
    """nano GPT on the CPU, WSD, no mid-run evaluation; run.max_steps only where given."""
    base = {
        "model.preset": "nano", "model.arch": "gpt2", "data.dir": str(data_dir), "data.seq_len": "32", "data.prefetch": "0",
        "optim.batch_tokens": "64", "optim.micro_batch_size": "2", "optim.lr": "3e-3", "optim.warmup_steps": "1",
        "optim.schedule": "wsd", "optim.decay_frac": "0.5", "run.dir": str(run_dir), "run.device": "cpu", "run.precision": "fp32",
        "run.eval_every": "0", "run.eval_tokens": "512", "run.ckpt_every": "0", "run.sample_tokens": "4",
        "run.peak_tflops": "1.0",
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return C.resolve(None, list(base.items()))


def lrs(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in rows if "lr" in r]


@pytest.fixture
def one_thread():
    """One torch thread: on a few shared cores it is the faster (the tolerances below are seconds)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_a_budgeted_run_ends_on_time_at_the_floor(tmp_path, shards_dir, one_thread):
    run = tmp_path / "run"
    t0 = time.time()
    res = train(nano_cfg(run, shards_dir, **{"run.max_minutes": 0.2, "run.max_steps": 100000}), progress=False)
    wall = time.time() - t0
    assert res.stopped == "time limit" and res.sample  # the budget's end is the run's end: it samples
    assert wall == pytest.approx(12.0, abs=1.5), wall
    got = lrs(run)
    assert got[-1] == 3e-3 * 0.1  # the last step ran at the floor
    assert 3e-3 in got and any(3e-4 < lr < 3e-3 for lr in got)  # a plateau, then the decay
    assert all(a >= b for a, b in zip(got[1:], got[2:]))


def test_max_steps_not_given_does_not_cap_a_budget(tmp_path, shards_dir):
    cfg = nano_cfg(tmp_path / "run", shards_dir, **{"run.max_minutes": 0.01})
    assert cfg.run.max_steps == 550 and "run.max_steps" not in cfg.explicit
    assert not max_steps_binds(cfg.explicit, cfg.resolved, cfg.run.max_minutes)


def test_resume_continues_the_clock(tmp_path, shards_dir, one_thread):
    run = tmp_path / "run"
    first = train(nano_cfg(run, shards_dir, **{"run.max_minutes": 0.1, "run.max_steps": 3}), progress=False)
    assert first.stopped == "done" and first.step == 3  # a given run.max_steps still caps
    spent = torch.load(first.last_checkpoint / "state.pt", weights_only=True)["clock"]["spent_s"]
    assert 0 < spent < 6
    t0 = time.time()
    cont = train(nano_cfg(run, shards_dir, **{"run.max_minutes": 0.1}), resume="auto", progress=False)
    wall = time.time() - t0
    assert cont.stopped == "time limit" and lrs(run)[-1] == 3e-3 * 0.1
    assert wall == pytest.approx(6.0 - spent, abs=1.5), (wall, spent)  # the rest of the budget, not a fresh one
    final = torch.load(ckpt.latest_checkpoint(run) / "state.pt", weights_only=True)["clock"]["spent_s"]
    assert final == pytest.approx(6.0, abs=1.5)


def test_progress_never_goes_back():
    """Steps that get faster move the horizon out; the LR does not rise again."""
    now = [0.0]
    clock = Clock(1.0, started=0.0, timer=lambda: now[0])
    for t in (0.0, 10.0, 20.0, 30.0):  # 10 s steps: horizon 50 s
        now[0] = t
        clock.progress()
    assert clock.now_progress == pytest.approx(30 / 50)
    seen = []
    for i in range(1, 13):  # now 0.5 s steps: the horizon moves out towards 59.5 s
        now[0] = 30.0 + 0.5 * i
        seen.append(clock.progress())
    assert clock.horizon() == pytest.approx(59.5) and now[0] / 59.5 < seen[-1]
    assert all(a <= b for a, b in zip(seen, seen[1:]))
