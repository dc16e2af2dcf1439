"""The depth and budget dials (config.dials): model.depth derives the shape and scales the rates,
run.tokens_per_param / run.target_flops derive the horizon, optim.batch_tokens auto the batch; a
key the user set wins; the dry run writes nothing; a resumed run keeps its horizon."""

from __future__ import annotations

import json

import pytest

from gptforge import config as C
from gptforge.commands import train as train_cmd
from gptforge.config import dials
from gptforge.errors import GPTForgeError
from gptforge.model import PRESETS
from gptforge.training import checkpoint as ckpt
from gptforge.training.build import saved_dials
from gptforge.training.trainer import train

VOCAB = 4096  # the default run's tokenizer (data.tokenizer train:4096)


def derived(*args: str, vocab: int = VOCAB, world_size: int = 1) -> C.TrainConfig:
    cfg = C.resolve(None, C.parse_overrides(list(args)))
    dials.derive(cfg, vocab, world_size)
    return cfg


def test_depth_gives_the_default_and_gpt2_shapes():
    mini, gpt2 = PRESETS["mini"], PRESETS["gpt2"]
    assert dials.shape(4, 64, 64) == {k: mini[k] for k in ("n_layer", "n_embd", "n_head")}
    assert dials.shape(12, 64, 64) == gpt2
    assert dials.shape(5, 50, 64) == {"n_layer": 5, "n_embd": 256, "n_head": 4}  # 250 rounded up to 4 heads of 64


@pytest.mark.parametrize("depth, width, lr, wd, steps", [
    (6, 384, 0.002 * (384 / 256) ** -0.5, 0.1 * 2_252_800 / (59548 * 4096), 59548),
    (12, 768, 0.002 * 3 ** -0.5, 0.1 * 2_252_800 / (430181 * 4096), 430181),
])
def test_depth_and_tokens_per_param_pin_every_derived_value(depth, width, lr, wd, steps):
    cfg = derived("--model.depth", str(depth), "--run.tokens_per_param", "20")
    g = cfg.model.gpt_config(VOCAB)
    assert (g.n_layer, g.n_embd, g.n_head, g.head_dim) == (depth, width, width // 64, 64)
    o = cfg.optim
    assert o.lr == pytest.approx(lr, rel=1e-12)
    assert (o.embed_lr, o.head_lr) == (0.0, 0.0)  # 0 = optim.lr: follows the scaled lr
    assert o.muon_lr == 0.02  # Muon's shape scaling carries it across widths
    assert o.weight_decay == pytest.approx(wd, rel=1e-12) and o.muon_weight_decay == 0.0
    assert o.batch_tokens == 4096
    n = dials.scaling_params(dials.meta_model(g))
    assert cfg.run.max_steps == steps == round(20 * n / 4096)
    assert cfg.resolved["dials"]["values"]["run.max_steps"] == steps
    lines = "\n".join(cfg.resolved["dials"]["lines"])
    assert f"n_embd {width} = depth {depth} x aspect_ratio 64" in lines
    assert f"max_steps {steps} = tokens_per_param 20 x {n / 1e6:.2f}M params / 4096 tokens per step" in lines


def test_batch_auto_follows_the_horizon_and_scales_the_rates():
    cfg = derived("--model.depth", "12", "--run.tokens_per_param", "20", "--optim.batch_tokens", "auto")
    # 4096 x (1.76e9 / 2.25e6)^0.383 = 52,540 -> 256 x 2^8
    assert cfg.optim.batch_tokens == 65536 and cfg.run.max_steps == 26886
    assert cfg.optim.lr == pytest.approx(0.002 * 3 ** -0.5 * 4)
    assert cfg.optim.muon_lr == pytest.approx(0.08)  # x (65536/4096)^0.5
    two = derived("--model.depth", "12", "--run.tokens_per_param", "20", "--optim.batch_tokens", "auto", world_size=2)
    assert two.optim.batch_tokens % (256 * 2) == 0
    # the default run's horizon gives the default run's batch
    assert dials.auto_batch(550 * 4096, 256) == 4096


def test_target_flops_sets_the_steps():
    cfg = derived("--model.depth", "4", "--run.target_flops", "1e15")
    model = dials.meta_model(cfg.model.gpt_config(VOCAB))
    assert cfg.run.max_steps == round(1e15 / model.flops_per_token(256) / 4096)


def test_explicit_keys_win():
    cfg = derived("--model.depth", "12", "--model.n_head", "6", "--optim.lr", "3e-3", "--optim.head_lr", "1e-3",
                  "--run.tokens_per_param", "20")
    g = cfg.model.gpt_config(VOCAB)
    assert (g.n_layer, g.n_embd, g.n_head) == (12, 768, 6)
    assert cfg.optim.lr == 3e-3 and cfg.optim.head_lr == 1e-3
    assert "lr 0.003 (set)" in cfg.resolved["dials"]["lines"]
    assert cfg.run.max_steps == round(20 * dials.scaling_params(dials.meta_model(g)) / 4096)


def test_without_dials_nothing_changes():
    cfg = derived()
    assert cfg.to_dict() == C.TrainConfig().to_dict() and "dials" not in cfg.resolved
    assert C.TrainConfig().model.gpt_config(VOCAB) == derived("--model.depth", "4").model.gpt_config(VOCAB)


@pytest.mark.parametrize("args, message", [
    (["--run.max_steps", "100", "--run.tokens_per_param", "20"],
     "run.max_steps and run.tokens_per_param each set the number of steps: give one"),
    (["--run.max_steps", "100", "--run.target_flops", "1e15"], "run.max_steps and run.target_flops"),
    (["--run.tokens_per_param", "20", "--run.target_flops", "1e15"], "give one"),
    (["--run.max_minutes", "2", "--run.target_flops", "1e15"],
     "run.max_minutes and run.target_flops each set the schedule's horizon: give one"),
    (["--optim.batch_tokens", "auto"], "optim.batch_tokens auto needs a token horizon"),
    (["--model.depth", "-1"], "model.depth must be >= 0"),
    (["--model.init_from", "gpt2", "--run.tokens_per_param", "20"], "run.tokens_per_param and model.init_from exclude"),
])
def test_conflicts_are_one_clear_error(args, message):
    with pytest.raises(GPTForgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        C.resolve(None, C.parse_overrides(args))


def test_dry_run_prints_the_derived_values_and_writes_nothing(tmp_path, monkeypatch, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    monkeypatch.setenv("GPTFORGE_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    rc = train_cmd.main(["--model.depth", "12", "--run.dry_run", "true", "--run.tokens_per_param", "20",
                         "--data.tokenizer", "gpt2", "--run.dir", str(run)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "dial n_embd 768 = depth 12 x aspect_ratio 64" in out and "dial max_steps" in out
    assert "n_layer=12, n_head=12, n_embd=768" in out and "vocab_size=50257" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, no cache, no runs/


def test_resume_keeps_the_horizon(tmp_path, shards_dir, monkeypatch, capsys):
    run = tmp_path / "run"
    over = {"model.preset": "nano", "model.arch": "gpt2", "model.depth": "1", "model.head_dim": "32",
            "data.dir": str(shards_dir), "data.seq_len": "32", "data.prefetch": "0", "optim.batch_tokens": "256",
            "optim.micro_batch_size": "4", "optim.warmup_steps": "1", "run.tokens_per_param": "0.0003",
            "run.dir": str(run), "run.device": "cpu", "run.precision": "fp32", "run.eval_every": "0",
            "run.eval_tokens": "64", "run.ckpt_every": "2", "run.sample_tokens": "0", "run.peak_tflops": "1.0"}
    cfg = C.resolve(None, list(over.items()))
    first = train(cfg, progress=False)
    steps = cfg.run.max_steps
    assert first.step == steps == 4
    banner = capsys.readouterr().out
    assert "dial n_embd 64 = depth 1 x aspect_ratio 64" in banner and "dial max_steps 4 = tokens_per_param 0.0003" in banner
    saved = json.loads((run / "config.json").read_text())
    assert saved["resolved"]["dials"]["values"]["run.max_steps"] == steps
    # resumed with a model that would derive another horizon: the run's own is kept
    monkeypatch.setattr(dials, "scaling_params", lambda model: 10 * model.num_params(non_embedding=True))
    assert derived(*(f"--{k}={v}" for k, v in over.items()), vocab=50257).run.max_steps > 5 * steps
    step2 = run / "checkpoints" / "step_000002"
    again, _ = train_cmd.build_config(["--resume", str(step2)])  # the command line's resume: no conflict, same horizon
    assert again.run.max_steps == steps and again.run.tokens_per_param == 0.0003
    capsys.readouterr()
    fresh = C.resolve(None, list(over.items()))  # a fresh config: the horizon comes back from the checkpoint
    assert train(fresh, resume=str(step2), progress=False).step == steps == fresh.run.max_steps
    assert "dial max_steps 4 = tokens_per_param 0.0003" in capsys.readouterr().out
    longer, _ = train_cmd.build_config(["--resume", str(step2), "--run.tokens_per_param", "0", "--run.max_steps", "9"])
    assert "max_steps 9 (set)" in dials.derive(longer, 50257, saved=saved_dials(step2)) and longer.run.max_steps == 9
    assert ckpt.checkpoint_meta(ckpt.latest_checkpoint(run))[1]["resolved"]["dials"]["values"]["run.max_steps"] == steps
