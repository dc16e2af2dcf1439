"""optim.ema: an exponential moving average of the weights, used for evaluation, samples and the
checkpoints' model files; the training itself untouched and exactly resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptforge import config as C
from gptforge.errors import GPTForgeError
from gptforge.training import checkpoint as ckpt
from gptforge.training.ema import decay_at
from gptforge.training.trainer import train

NANO = {
    "model.preset": "nano", "model.arch": "modern", "data.seq_len": "32", "data.prefetch": "0", "optim.batch_tokens": "256",
    "optim.micro_batch_size": "4", "optim.warmup_steps": "2", "run.max_steps": "6", "run.device": "cpu",
    "run.precision": "fp32", "run.eval_every": "3", "run.eval_tokens": "512", "run.ckpt_every": "1", "run.keep_last": "10",
    "run.sample_tokens": "4", "run.peak_tflops": "1.0",
}


def cfg(run_dir: Path, data_dir: Path, **overrides) -> C.TrainConfig:
    d = {**NANO, "data.dir": str(data_dir), "run.dir": str(run_dir), **{k: str(v) for k, v in overrides.items()}}
    return C.resolve(None, list(d.items()))


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(step_dir / "model.safetensors"))


def train_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(step_dir / ckpt.STATE, weights_only=True)["train_weights"]


def test_decay_ramps_up_to_the_configured_value():
    assert [decay_at(0.99, t) for t in (0, 1, 8)] == pytest.approx([0.1, 2 / 11, 0.5])
    assert decay_at(0.99, 10_000) == 0.99


def test_the_model_file_is_the_average_of_the_training_weights_which_ema_leaves_alone(tmp_path, shards_dir):
    """A checkpoint every step: the model file of the last is the EMA (decay 0.8, its ramp) of the
    training weights of all of them, computed here from state.pt's; those training weights are a run
    without EMA's, bit for bit; val bpb is the average's, the training weights' beside it."""
    plain = tmp_path / "plain"
    plain_res = train(cfg(plain, shards_dir), progress=False)
    run = tmp_path / "ema"
    res = train(cfg(run, shards_dir, **{"optim.ema": 0.8}), progress=False)
    steps = [p for _, p in ckpt.list_checkpoints(run)]
    assert len(steps) == 6
    for step_dir in steps:  # the training is the plain run's
        w = train_weights(step_dir)
        assert all(torch.equal(w[k], v) for k, v in weights(plain / "checkpoints" / step_dir.name).items())
    # from the average after step 0 (step_000001's model file), one lerp per step with the ramped decay
    avg = weights(steps[0])
    for t in range(1, 6):
        w, d = train_weights(steps[t]), decay_at(0.8, t)
        avg = {k: d * v + (1 - d) * w[k] for k, v in avg.items()}
    final = weights(steps[-1])
    for k, v in final.items():
        torch.testing.assert_close(v, avg[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(v, train_weights(steps[-1])[k]) for k, v in final.items())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_bpb" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(r["val_bpb"] != r["val_bpb_raw"] for r in evals)
    plain_rows = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_bpb_raw"] for r in evals] == [r["val_bpb"] for r in plain_rows if "val_bpb" in r]
    assert res.losses == plain_res.losses


def test_resume_continues_the_average_and_the_training_bit_for_bit(tmp_path, shards_dir):
    full = tmp_path / "full"
    train(cfg(full, shards_dir, **{"optim.ema": 0.9, "run.ckpt_every": 3}), progress=False)
    half = tmp_path / "half"
    train(cfg(half, shards_dir, **{"optim.ema": 0.9, "run.ckpt_every": 3, "run.max_steps": 3}), progress=False)
    train(cfg(half, shards_dir, **{"optim.ema": 0.9, "run.ckpt_every": 3}), resume="auto", progress=False)
    a, b = ckpt.latest_checkpoint(full), ckpt.latest_checkpoint(half)
    assert a.name == b.name == "step_000006"
    for x, y in ((weights(a), weights(b)), (train_weights(a), train_weights(b))):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_checkpoint_with_an_average_resumes_its_training_weights_without_ema(tmp_path, shards_dir):
    """optim.ema off on resume: training goes on from state.pt's training weights, not the average."""
    plain = tmp_path / "plain"
    train(cfg(plain, shards_dir, **{"run.ckpt_every": 3}), progress=False)
    run = tmp_path / "run"
    train(cfg(run, shards_dir, **{"optim.ema": 0.9, "run.ckpt_every": 3, "run.max_steps": 3}), progress=False)
    train(cfg(run, shards_dir, **{"run.ckpt_every": 3}), resume="auto", progress=False)
    a, b = weights(ckpt.latest_checkpoint(plain)), weights(ckpt.latest_checkpoint(run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_ema_is_one_line_naming_the_key(tmp_path, shards_dir):
    with pytest.raises(GPTForgeError, match=r"optim.ema must be in \[0, 1\) \(0 = off\), got 1.0"):
        cfg(tmp_path, shards_dir, **{"optim.ema": 1.0})
