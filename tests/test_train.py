"""The training loop: loss falls, accumulation is exact, resume is bitwise, failures are clean."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge import config as C
from gptforge.errors import GPTForgeError
from gptforge.training import checkpoint as ckpt
from gptforge.training.trainer import Trainer, train


def small_cfg(run_dir: Path, data_dir: Path, **overrides) -> C.TrainConfig:
    """nano GPT, 32-token sequences, 2 micro-steps of 4 sequences per step, fp32 on CPU."""
    base = {
        "model.preset": "nano", "model.arch": "gpt2", "data.dir": str(data_dir), "data.seq_len": "32", "data.prefetch": "0",
        "optim.batch_tokens": "256", "optim.micro_batch_size": "4", "optim.lr": "3e-3", "optim.warmup_steps": "2",
        "run.dir": str(run_dir), "run.max_steps": "6", "run.device": "cpu", "run.precision": "fp32",
        "run.eval_every": "0", "run.eval_tokens": "1024", "run.ckpt_every": "3", "run.sample_tokens": "8",
        "run.peak_tflops": "1.0",
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return C.resolve(None, list(base.items()))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls(tmp_path, shards_dir):
    res = train(small_cfg(tmp_path / "run", shards_dir, **{"run.max_steps": 40, "run.ckpt_every": 0}), progress=False)
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert losses[0] == pytest.approx(math.log(50257), abs=0.6)
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0
    assert res.val_loss is not None and res.val_loss < losses[0] - 1.5


def test_sample_tokens_zero_means_no_sample(tmp_path, shards_dir, capsys):
    """--run.sample_tokens 0 is accepted and turns sampling off: none with the evaluations (nor
    at sample_every), none at the end; a negative count is still an error."""
    res = train(small_cfg(tmp_path / "run", shards_dir, **{"run.max_steps": 2, "run.eval_every": 1, "run.sample_every": 1,
                                                            "run.sample_tokens": 0, "run.ckpt_every": 0}), progress=False)
    out = capsys.readouterr().out
    assert res.step == 2 and res.sample == "" and res.val_loss is not None
    assert "step      1 | val loss" in out and "| sample:" not in out
    with pytest.raises(GPTForgeError, match=r"run.sample_tokens must be >= 0, got -1"):
        small_cfg(tmp_path / "run2", shards_dir, **{"run.sample_tokens": -1})


def test_metrics_rows_and_run_files(tmp_path, shards_dir, capsys):
    run = tmp_path / "run"
    res = train(small_cfg(run, shards_dir, **{"run.max_steps": 4, "run.eval_every": 2}), progress=False)
    out = capsys.readouterr().out
    assert "step      2 | val loss" in out and "step      2 | sample: " in out  # a sample with each eval
    rows = metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [0, 1, 2, 3]
    for r in train_rows:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_s", "mfu", "tokens"}
        assert r["dt_ms"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"]
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert eval_rows[-1]["val_ppl"] == pytest.approx(math.exp(eval_rows[-1]["val_loss"]), rel=1e-6)
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["batch_tokens"] == 256 and saved["model"]["preset"] == "nano"
    assert res.sample  # a short sample is produced at the end
    last = ckpt.latest_checkpoint(run)
    assert last.name == "step_000004"
    meta = json.loads((last / "config.json").read_text())
    assert meta["train"]["run"]["max_steps"] == 4 and meta["step"] == 4 and meta["model"]["n_layer"] == 2


def test_micro_batches_equal_one_big_batch(tmp_path, shards_dir):
    """k micro-batches of B == one batch of k*B: the accumulated loss is the mean, not the sum."""
    a = train(small_cfg(tmp_path / "a", shards_dir, **{"data.order": "sequential", "run.max_steps": 3,
                                                     "optim.micro_batch_size": 8}), progress=False)
    b = train(small_cfg(tmp_path / "b", shards_dir, **{"data.order": "sequential", "run.max_steps": 3,
                                                     "optim.micro_batch_size": 2}), progress=False)
    for s in range(3):
        assert a.losses[s] == pytest.approx(b.losses[s], abs=1e-5)


@pytest.mark.parametrize("order,prefetch", [("shuffle", 0), ("sequential", 2)])
def test_resume_is_bitwise_exact(tmp_path, shards_dir, order, prefetch):
    over = {"data.order": order, "data.prefetch": prefetch, "model.dropout": 0.1}
    full = train(small_cfg(tmp_path / "full", shards_dir, **over), progress=False)
    half = small_cfg(tmp_path / "half", shards_dir, **over, **{"run.max_steps": 3})
    first = train(half, progress=False)
    cont = train(small_cfg(tmp_path / "half", shards_dir, **over), resume="auto", progress=False)
    assert sorted(first.losses) == [0, 1, 2] and sorted(cont.losses) == [3, 4, 5]
    for s in range(6):
        got = first.losses.get(s, cont.losses.get(s))
        assert got == full.losses[s], f"step {s}: {got!r} != {full.losses[s]!r}"  # bitwise
    assert cont.val_loss == full.val_loss


def test_resume_auto_skips_half_written_checkpoints(tmp_path, shards_dir):
    run = tmp_path / "run"
    train(small_cfg(run, shards_dir), progress=False)
    cdir = ckpt.checkpoints_dir(run)
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step_000003", "step_000006"]
    (cdir / ".tmp-step_000009.abc").mkdir()  # an interrupted write
    (cdir / ".tmp-step_000009.abc" / "model.safetensors").write_bytes(b"\0" * 10)
    partial = cdir / "step_000012"  # a directory missing its state
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"junk")
    assert ckpt.resolve_resume("auto", run).name == "step_000006"


def test_keep_last(tmp_path, shards_dir):
    run = tmp_path / "run"
    train(small_cfg(run, shards_dir, **{"run.max_steps": 5, "run.ckpt_every": 1, "run.keep_last": 2}), progress=False)
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step_000004", "step_000005"]


def test_training_state_loads_with_weights_only(tmp_path, shards_dir):
    run = tmp_path / "run"
    train(small_cfg(run, shards_dir, **{"run.max_steps": 3}), progress=False)
    state = torch.load(ckpt.latest_checkpoint(run) / "state.pt", weights_only=True)
    assert state["step"] == 3 and {"optimizer", "rng", "loader", "scaler", "lr_scale"} <= set(state)


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, shards_dir, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(small_cfg(run, shards_dir, **{"run.ckpt_every": 2}), progress=False)
    real_forward = trainer.model.forward

    def forward(idx, targets=None, **kw):
        logits, loss = real_forward(idx, targets, **kw)
        if trainer.step == 3:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(trainer.model, "forward", forward)
    with pytest.raises(GPTForgeError, match=r"loss is nan at step 3"):
        trainer.run()
    ckpts = ckpt.list_checkpoints(run)
    assert [s for s, _ in ckpts] == [2]
    assert torch.load(ckpts[0][1] / "state.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("optimizer", ["fused", "foreach", "muon"])
def test_nan_loss_between_logging_steps_stops_with_its_step_and_keeps_the_last_checkpoint(
        tmp_path, shards_dir, monkeypatch, optimizer):
    """log_every 4, spike guard off: the host reads only when it logs or before a checkpoint, for
    every optimizer shipped. Step 2's loss is NaN and nobody reads it then; the read before step
    4's checkpoint stops the run with the usual message naming step 2, and the checkpoint left is
    step 2's, as it was written."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    over = {"fused": {"optim.fused": "on"}, "foreach": {"optim.fused": "off"}, "muon": {"optim.name": "muon"}}[optimizer]
    trainer = Trainer(small_cfg(run, shards_dir, **{"run.ckpt_every": 2, "run.log_every": 4, **over}), progress=False)
    real_forward = trainer.model.forward

    def forward(idx, targets=None, **kw):
        logits, loss = real_forward(idx, targets, **kw)
        if trainer.step == 2:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(trainer.model, "forward", forward)
    with pytest.raises(GPTForgeError, match=r"loss is nan at step 2; stopping"):
        trainer.run()
    assert trainer.step == 4  # step 3 ran before the read
    ckpts = ckpt.list_checkpoints(run)
    assert [s for s, _ in ckpts] == [2]
    saved = load_file(ckpts[0][1] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("optimizer", ["fused", "foreach", "muon"])
@pytest.mark.parametrize("guard", ["off", "on"])
def test_the_host_reads_the_device_only_when_it_logs_unless_the_guard_is_on(
        tmp_path, shards_dir, monkeypatch, optimizer, guard):
    """log_every 4 over 8 steps: with the spike guard off no step between logging steps reads the
    device (no .item(), .tolist(), float(), bool() of a tensor, no synchronize), whatever the
    optimizer (fused AdamW, for-each AdamW, MuonAdamW): steps 0 and 4 each read once, in one
    transfer, the values of the steps since the last read. With the guard on, every step reads
    once, before its update. The losses are those of a run that reads every step."""
    from gptforge.training import distributed as distrib
    from gptforge.training import trainer as trainer_mod

    over = {"fused": {"optim.fused": "on"}, "foreach": {"optim.fused": "off"}, "muon": {"optim.name": "muon"}}[optimizer]
    cfg = lambda name, **more: small_cfg(tmp_path / name, shards_dir, **{"run.max_steps": 8, "data.order": "sequential",  # noqa: E731
                                                                         "optim.spike_guard": guard, **over, **more})
    quiet, every = Trainer(cfg("quiet", **{"run.log_every": 4}), progress=False), Trainer(cfg("every"), progress=False)
    reads, syncs = [], []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a):
            if "gptforge" in sys._getframe(1).f_code.co_filename:  # ours; torch's own CPU-side counters aside
                reads.append((quiet.step, name))
            return original(self, *a)
        return read

    try:
        want = [every.train_step()["loss"] for _ in range(8)]
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, counted(name))
        monkeypatch.setattr(trainer_mod, "synchronize", lambda device: syncs.append(quiet.step))
        host_values = distrib.host_values
        monkeypatch.setattr(distrib, "host_values", lambda *ts: reads.append((quiet.step, "host_values")) or host_values(*ts))
        rows = [quiet.train_step() for _ in range(8)]
        monkeypatch.undo()
        read_steps = sorted({s for s, _ in reads})
        assert read_steps == ([0, 4] if guard == "off" else list(range(8))), reads
        assert [n for _, n in reads] == ["host_values", "tolist"] * len(read_steps)  # one transfer each
        assert syncs == [0, 0, 4, 4]
        if guard == "off":
            assert ["loss" in r for r in rows] == [True] * 5 + [False] * 3  # 5..7: on the device still
        quiet.read_values()  # what the loop does before an evaluation, a checkpoint, the end
        assert [r["loss"] for r in rows] == want
    finally:
        for t in (quiet, every):
            t.loader.close()
            t.val_loader.close()


def test_resume_with_other_architecture_is_refused(tmp_path, shards_dir):
    run = tmp_path / "run"
    train(small_cfg(run, shards_dir, **{"run.max_steps": 3}), progress=False)
    with pytest.raises(GPTForgeError, match="architecture"):
        train(small_cfg(run, shards_dir, **{"model.n_embd": 128}), resume="auto", progress=False)


def test_default_config_runs_a_few_steps(tmp_path, shards_dir):
    cfg = C.resolve(Path(__file__).parent.parent / "configs" / "default.toml", [
        ("data.dir", str(shards_dir)), ("run.dir", str(tmp_path / "run")), ("run.max_steps", "2"),
        ("optim.batch_tokens", "1024"), ("optim.micro_batch_size", "2"), ("data.seq_len", "128"),
        ("run.eval_tokens", "512"), ("run.sample_tokens", "4"), ("run.peak_tflops", "1")])
    res = train(cfg, progress=False)
    assert res.step == 2 and all(math.isfinite(v) for v in res.losses.values())


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_cli_train_then_resume_extends_the_run(tmp_path, shards_dir):
    run = tmp_path / "run"
    flags = ["--model.preset", "nano", "--data.dir", str(shards_dir), "--data.seq_len=32", "--optim.batch_tokens", "128",
             "--optim.micro_batch_size", "4", "--run.dir", str(run), "--run.max_steps", "2", "--run.device", "cpu",
             "--run.sample_tokens", "4", "--run.eval_tokens", "256", "--run.peak_tflops", "1"]
    p = run_cli("train", *flags)
    assert p.returncode == 0, p.stderr
    assert "--- sample ---" in p.stdout and "final val loss" in p.stdout
    p = run_cli("train", "--resume", "auto", "--run.dir", str(run), "--run.max_steps", "4")
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout and "step_000002" in p.stdout
    steps = [r["step"] for r in metrics(run) if "loss" in r]
    assert steps == [0, 1, 2, 3]


def test_cli_config_errors_are_one_line(tmp_path, shards_dir):
    p = run_cli("train", "--optim.learning_rate", "1")
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "unknown key 'optim.learning_rate'" in p.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nbatch_tokens = 1000\nmicro_batch_size = 3\n[run]\ndevice = 'cpu'\n")
    p = run_cli("train", "--config", str(bad), "--data.dir", str(shards_dir))
    assert p.returncode == 1 and "must be a multiple of" in p.stderr
    p = run_cli("train", "--data.dir", str(tmp_path))  # not prepared: one line naming the directory
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and "is not a prepared data directory" in p.stderr


def test_hellaswag_inside_training_is_logged(tmp_path, shards_dir):
    path = tmp_path / "hellaswag_val.jsonl"
    with open(path, "w") as f:
        for i in range(3):
            f.write(json.dumps({"ind": i, "ctx": "import os", "label": i % 4, "split": "val",
                                "endings": [" x = 1", " def f():", " return", " pass"]}) + "\n")
    run = tmp_path / "run"
    train(small_cfg(run, shards_dir, **{"run.max_steps": 4, "run.hellaswag_every": 2,
                                        "run.hellaswag_path": str(path)}), progress=False)
    hs = [r for r in metrics(run) if "hellaswag_acc" in r]
    assert [r["step"] for r in hs] == [2, 4]
    for r in hs:  # 3 examples: accuracies are multiples of 1/3
        assert round(r["hellaswag_acc"] * 3, 6) in (0, 1, 2, 3) and 0 <= r["hellaswag_acc_norm"] <= 1


def test_ctrl_c_checkpoints_and_exits_cleanly(tmp_path, shards_dir):
    import signal
    import time

    run = tmp_path / "run"
    flags = ["--model.preset", "nano", "--data.dir", str(shards_dir), "--data.seq_len", "32", "--optim.batch_tokens", "128",
             "--optim.micro_batch_size", "4", "--run.dir", str(run), "--run.max_steps", "100000", "--run.device", "cpu",
             "--run.precision", "fp32", "--run.ckpt_every", "0", "--run.eval_every", "0", "--run.eval_tokens", "256",
             "--run.peak_tflops", "1"]
    p = subprocess.Popen([sys.executable, "-m", "gptforge", "train", *flags], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "stopped (interrupted)" in out and "resume with --resume auto" in out
    done = [r["step"] for r in metrics(run) if "loss" in r]
    last = ckpt.latest_checkpoint(run)
    assert last is not None and last.name == ckpt.step_dir_name(len(done))  # every finished step is kept
    assert torch.load(last / "state.pt", weights_only=True)["step"] == len(done)


def test_time_limit_stops_after_a_finished_step_and_resumes(tmp_path, shards_dir):
    run = tmp_path / "run"
    res = train(small_cfg(run, shards_dir, **{"run.max_minutes": 1e-6, "run.ckpt_every": 0}), progress=False)
    assert res.stopped == "time limit" and res.step == 1 and res.last_checkpoint.name == "step_000001"
    res = train(small_cfg(run, shards_dir, **{"run.ckpt_every": 0}), resume="auto", progress=False)
    assert res.stopped == "done" and sorted(res.losses) == [1, 2, 3, 4, 5]
