"""optim.name muon and optim.schedule wsd: the grouping, the update against torch.optim.Muon used
directly, the schedule's values, the trainer (CLI, bitwise resume, spike guard), DDP on 2 gloo
ranks against one process, and the refusals (bad values, a checkpoint of the other optimizer)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge import config as C
from gptforge.training import plan as P
from gptforge.errors import GPTForgeError
from gptforge.model import GPT, preset
from gptforge.training import checkpoint as ckpt
from gptforge.training.optim import MuonAdamW, describe, lr_at, make_optimizer, set_lr
from gptforge.training.trainer import Trainer, train

CPU = torch.device("cpu")


def muon_args(**kw) -> C.OptimArgs:
    """Plain Muon (torch.optim.Muon's step: no variant) unless kw names one; the AdamW part at GPT-2's 6e-4."""
    return C.OptimArgs(**{"name": "muon", "lr": 6e-4, "muon_normuon": False, "muon_split": False, **kw})


def untied_nano() -> GPT:
    """nano with a separate lm_head.weight (GPT-2 ties it): the head group of the modern model."""
    model = GPT(preset("nano"))
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    return model


# ------------------------------------------------------------------ grouping
@pytest.mark.parametrize("tied", [True, False])
def test_every_parameter_in_exactly_one_group_and_only_block_matrices_under_muon(tied):
    model = GPT(preset("nano")) if tied else untied_nano()
    opt = make_optimizer(model, muon_args(embed_lr=1e-3, head_lr=2e-3, muon_lr=0.05), CPU, "muon")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))  # each exactly once; a tied head once
    by_kind = {g["kind"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups}
    n_layer = model.config.n_layer
    assert sorted(by_kind["muon"]) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(n_layer)
                                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert by_kind["embed"] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert by_kind.get("head") == (None if tied else ["lm_head.weight"])
    assert all(model.get_parameter(n).dim() < 2 for n in by_kind["gain"]) and len(by_kind["gain"]) == 8 * n_layer + 2
    assert "matrix" not in by_kind  # GPT-2 has no other matrices
    # the Muon half holds exactly the muon group; AdamW the rest
    assert [g["kind"] for g in opt.muon.param_groups] == ["muon"]
    assert all(g["kind"] != "muon" for g in opt.adamw.param_groups)
    lrs = {g["kind"]: (g["base_lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs["muon"] == (0.05, 0.0) and lrs["embed"] == (1e-3, 0.1) and lrs["gain"] == (6e-4, 0.0)
    assert tied or lrs["head"] == (2e-3, 0.1)
    line = describe(opt, muon_args())
    assert line.startswith(f"optimizer muon: {4 * n_layer} matrices (") and "lr 0.05 momentum 0.95" in line
    assert "| adamw: wte + wpe (" in line and ("lm_head" in line) != tied and f"{len(by_kind['gain'])} gains/biases" in line


def test_embed_and_head_lr_zero_mean_optim_lr():
    opt = make_optimizer(untied_nano(), muon_args(lr=3e-4), CPU, "muon")
    assert {g["kind"]: g["base_lr"] for g in opt.param_groups} == {"muon": 0.02, "embed": 3e-4, "head": 3e-4, "gain": 3e-4}


def test_adamw_path_is_plain_torch_adamw():
    opt = make_optimizer(GPT(preset("nano")), C.OptimArgs(), CPU)
    assert type(opt) is torch.optim.AdamW and all("kind" not in g for g in opt.param_groups)
    set_lr(opt, 1.25e-4, C.OptimArgs())
    assert [g["lr"] for g in opt.param_groups] == [1.25e-4, 1.25e-4]


# ------------------------------------------------------------------ the update is torch's
def test_step_equals_torch_muon_and_adamw_used_directly():
    """Three steps of MuonAdamW (with the schedule's multiplier) against torch.optim.Muon on the
    block matrices and torch.optim.AdamW on the rest, built by hand from the documented example:
    the wrapper adds nothing to either update, and its state_dict resumes them exactly."""
    torch.manual_seed(0)
    args = muon_args(muon_lr=0.03, muon_momentum=0.9, muon_weight_decay=0.01, embed_lr=1e-3, head_lr=2e-3)
    a, b = untied_nano(), None
    b = copy.deepcopy(a)
    opt = make_optimizer(a, args, CPU, "muon")
    pa = dict(b.named_parameters())
    hidden = [p for n, p in pa.items() if n.startswith("transformer.h.") and p.dim() == 2]
    ref_muon = torch.optim.Muon(hidden, lr=0.03, momentum=0.9, weight_decay=0.01, adjust_lr_fn="original")
    ref_adam = torch.optim.AdamW([
        {"params": [pa["transformer.wte.weight"], pa["transformer.wpe.weight"]], "lr": 1e-3, "weight_decay": 0.1},
        {"params": [pa["lm_head.weight"]], "lr": 2e-3, "weight_decay": 0.1},
        {"params": [p for p in pa.values() if p.dim() < 2], "lr": 6e-4, "weight_decay": 0.0},
    ], betas=(0.9, 0.95), eps=1e-8)
    x = torch.randint(0, 1000, (2, 16))
    for step, mult in enumerate((0.5, 1.0, 0.25)):
        if step == 2:  # through a state_dict round trip into a fresh optimizer
            opt2 = make_optimizer(a, args, CPU, "muon")
            opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt = opt2
        set_lr(opt, 6e-4 * mult, args)
        for g, lr in zip(ref_muon.param_groups + ref_adam.param_groups, (0.03, 1e-3, 2e-3, 6e-4)):
            g["lr"] = lr * mult
        for model, o in ((a, opt), (b, None)):
            _, loss = model(x, x)
            loss.backward()
        opt.step()
        ref_muon.step()
        ref_adam.step()
        opt.zero_grad(set_to_none=True)
        ref_muon.zero_grad(set_to_none=True)
        ref_adam.zero_grad(set_to_none=True)
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), f"step {step}: {n} differs"
    assert all("momentum_buffer" in opt.state[p] for p in opt.param_groups[0]["params"])


def test_muon_update_is_newton_schulz_of_the_nesterov_momentum():
    """One matrix, one step, against the update torch documents: B = mu*0 + g (lerp form),
    nesterov g + mu*(B - g)..., NS5 in bf16 on the matrix scaled to norm 1, lr * sqrt(max(1, A/B))."""
    w = torch.nn.Parameter(torch.randn(8, 4))
    g = torch.randn(8, 4)
    w0 = w.detach().clone()
    opt = torch.optim.Muon([w], lr=0.1, momentum=0.95, weight_decay=0.0, adjust_lr_fn="original")
    w.grad = g.clone()
    opt.step()
    buf = (1 - 0.95) * g  # lerp_(g, 1 - mu) from zero
    update = g.lerp(buf, 0.95)
    x = update.bfloat16().T  # wide: 4 x 8
    x = x / x.norm().clamp(min=1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    want = w0 - 0.1 * math.sqrt(8 / 4) * x.T.float()
    torch.testing.assert_close(w.detach(), want, atol=2e-2, rtol=0)  # bf16 iterations: a few ulps of bf16


# ------------------------------------------------------------------ schedules
def test_wsd_schedule_values():
    args = C.OptimArgs(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_frac=0.2)
    lrs = [lr_at(s, args, 100) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warmup as cosine's
    assert all(v == 1.0 for v in lrs[10:80])  # stable until the last 20 steps
    assert lrs[80] == 1.0 and lrs[90] == pytest.approx(0.55) and lrs[99] == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert all(a > b for a, b in zip(lrs[80:100], lrs[81:100]))  # linear decay
    assert lrs[100] == pytest.approx(0.1) and lrs[109] == pytest.approx(0.1)  # the end value, kept
    # decay_steps ends the decay earlier; decay_frac 0 is a step down at decay_steps
    short = C.OptimArgs(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_frac=0.5, decay_steps=40)
    assert lr_at(19, short, 100) == 1.0 and lr_at(30, short, 100) == pytest.approx(0.5) and lr_at(40, short, 100) == 0.0
    flat = C.OptimArgs(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_frac=0.0)
    assert lr_at(99, flat, 100) == 1.0 and lr_at(100, flat, 100) == 0.0


def test_cosine_unchanged_and_groups_share_the_multiplier():
    args = C.OptimArgs(lr=6e-4, min_lr_ratio=0.1, warmup_steps=10, decay_steps=110, schedule="cosine")
    for s in (0, 9, 10, 37, 60, 109, 110, 150):  # the formula as it was, bit for bit
        if s < 10:
            want = 6e-4 * (s + 1) / 10
        elif s >= 110:
            want = 6e-4 * 0.1
        else:
            lo = 6e-4 * 0.1
            want = lo + 0.5 * (1.0 + math.cos(math.pi * (s - 10) / 100)) * (6e-4 - lo)
        assert lr_at(s, args, 200) == want
    opt = make_optimizer(untied_nano(), muon_args(embed_lr=1e-3), CPU, "muon")
    got = set_lr(opt, lr_at(60, args, 200), args)
    m = lr_at(60, args, 200) / 6e-4
    assert got["muon"] == pytest.approx(0.02 * m) and got["embed"] == pytest.approx(1e-3 * m)
    assert got["gain"] == lr_at(60, args, 200) and got["head"] == lr_at(60, args, 200)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("key,value,message", [
    ("optim.name", "sgd", "optim.name must be one of auto, adamw, muon, got 'sgd'"),
    ("optim.schedule", "linear", "optim.schedule must be one of auto, cosine, wsd, got 'linear'"),
    ("optim.decay_frac", "1.5", "optim.decay_frac must be in [0, 1], got 1.5"),
    ("optim.muon_lr", "0", "optim.muon_lr must be a positive number, got 0.0"),
    ("optim.muon_momentum", "1", "optim.muon_momentum must be in [0, 1), got 1.0"),
    ("optim.muon_weight_decay", "-1", "optim.muon_weight_decay must be a number >= 0, got -1.0"),
    ("optim.muon_adjust_lr", "spectral", "optim.muon_adjust_lr must be one of original, match_rms_adamw, got 'spectral'"),
    ("optim.embed_lr", "-1e-3", "optim.embed_lr must be a number >= 0 (0 = optim.lr), got -0.001"),
    ("optim.head_lr", "nan", "--optim.head_lr: optim.head_lr expects a finite number, got 'nan'"),
    ("optim.muon_ns", "cubic", "optim.muon_ns must be one of torch, polar_express, got 'cubic'"),
    ("optim.muon_momentum_warmup", "-1", "optim.muon_momentum_warmup must be >= 0 (0 = off), got -1"),
])
def test_bad_values_are_one_line_naming_the_key(key, value, message):
    with pytest.raises(GPTForgeError) as e:
        C.resolve(None, [(key, value)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fsdp_with_muon_is_a_valid_config():
    """Muon runs under FSDP2 (training/muon.py orthogonalizes each whole matrix): no refusal."""
    from gptforge.commands.train import build_config

    build_config(["--optim.name", "muon", "--run.dist", "fsdp"])
    build_config(["--model.arch", "modern", "--run.dist", "fsdp"])
    assert P.optimizer_name(C.resolve(None, [("optim.name", "muon")])) == "muon"


def test_auto_is_muon_for_the_modern_recipe_and_adamw_for_gpt2():
    assert P.optimizer_name(C.resolve(None, [])) == "muon"  # the default run is the modern recipe's
    assert P.optimizer_name(C.resolve(None, [("model.arch", "gpt2")])) == "adamw"  # GPT-2 as in 2019
    assert P.optimizer_name(C.resolve(None, [("model.arch", "modern"), ("optim.name", "adamw")])) == "adamw"
    # with init_from the model's arch is the source's, which the trainer passes
    assert P.optimizer_name(C.resolve(None, [("model.init_from", "gpt2")]), arch="gpt2") == "adamw"


def test_schedule_auto_is_wsd_for_the_modern_recipe_and_cosine_for_gpt2():
    assert P.schedule_name(C.resolve(None, [])) == "wsd"  # measured with the modern recipe
    assert P.schedule_name(C.resolve(None, [("model.arch", "gpt2")])) == "cosine"  # sweep_lr's
    assert P.schedule_name(C.resolve(None, [("optim.schedule", "cosine")])) == "cosine"
    assert P.schedule_name(C.resolve(None, [("model.init_from", "gpt2")]), arch="gpt2") == "cosine"
    with pytest.raises(ValueError, match="resolved schedule"):
        lr_at(0, C.OptimArgs(), 10)  # auto means nothing until the arch is known


def test_muon_adjust_lr_choices_are_torchs():
    for fn in C.MUON_ADJUST_LR:  # each accepted by torch.optim.Muon
        torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn=fn)


# ------------------------------------------------------------------ the trainer
NANO = {
    "model.preset": "nano", "model.arch": "gpt2", "data.seq_len": "32", "data.prefetch": "0", "optim.batch_tokens": "256",
    "optim.micro_batch_size": "4", "optim.lr": "3e-3", "optim.warmup_steps": "2", "optim.name": "muon",
    "run.max_steps": "6", "run.device": "cpu", "run.precision": "fp32", "run.eval_every": "0",
    "run.eval_tokens": "512", "run.ckpt_every": "3", "run.sample_tokens": "4", "run.peak_tflops": "1.0",
}


def muon_cfg(run_dir: Path, data_dir: Path, **overrides) -> C.TrainConfig:
    d = {**NANO, "data.dir": str(data_dir), "run.dir": str(run_dir), **{k: str(v) for k, v in overrides.items()}}
    return C.resolve(None, list(d.items()))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cli(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "gptforge", "train", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_cli_muon_wsd_run_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, shards_dir):
    """`gptforge train --optim.name muon --optim.schedule wsd` stopped after 3 of 6 steps and resumed
    (Muon's momentum and AdamW's moments from the checkpoint) logs exactly the losses of one
    uninterrupted run; the banner shows the grouping, the rows the Muon lr."""
    over = {"optim.schedule": "wsd", "optim.decay_steps": "6", "optim.decay_frac": "0.5", "model.dropout": "0.1"}
    full = train(muon_cfg(tmp_path / "full", shards_dir, **over), progress=False)
    run = tmp_path / "half"
    flags = [a for k, v in {**NANO, **over, "data.dir": str(shards_dir), "run.dir": str(run)}.items() for a in (f"--{k}", v)]
    p = cli(*flags, "--run.max_steps", "3")
    assert "optimizer muon: 8 matrices (0.10M) lr 0.02 momentum 0.95" in p.stdout and "schedule wsd" in p.stdout
    assert "| adamw: wte + wpe (3.22M) lr 0.003 wd 0.1, 18 gains/biases" in p.stdout
    state = torch.load(ckpt.latest_checkpoint(run) / ckpt.STATE, weights_only=True)
    assert sum("momentum_buffer" in s for s in state["optimizer"]["state"].values()) == 8
    cli("--resume", "auto", "--run.dir", str(run), "--run.max_steps", "6")
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(6))
    assert {r["step"]: r["loss"] for r in rows} == full.losses  # bitwise
    mult = [lr_at(s, muon_cfg(run, shards_dir, **over).optim, 6) / 3e-3 for s in range(6)]
    assert [r["muon_lr"] for r in rows] == pytest.approx([0.02 * m for m in mult])
    assert mult[2:4] == [1.0, 1.0] and mult[4] == pytest.approx(1 - 0.9 / 3)  # flat, then the linear decay


def test_resume_refuses_a_checkpoint_of_the_other_optimizer(tmp_path, shards_dir):
    run = tmp_path / "run"
    train(muon_cfg(run, shards_dir, **{"run.max_steps": 1, "run.sample_tokens": 0}), progress=False)
    with pytest.raises(GPTForgeError, match=r"the checkpoint's optimizer is muon .* this run's is adamw .*--optim.name muon"):
        Trainer(muon_cfg(run, shards_dir, **{"optim.name": "adamw", "run.max_steps": 2}), resume="auto", progress=False)


def test_spike_guard_skips_a_muon_step_without_any_update(tmp_path, shards_dir, monkeypatch):
    """A garbage batch at step 18: the guard skips it (the host reads each step before its update
    while the guard is on), and neither the weights nor Muon's momentum nor AdamW's step count move."""
    cfg = muon_cfg(tmp_path / "run", shards_dir, **{"run.max_steps": 20, "run.ckpt_every": 0, "optim.spike_guard": "on",
                                                   "optim.spike_k": 4, "optim.spike_window": 8, "run.sample_tokens": 0})
    trainer = Trainer(cfg, progress=False)
    bad_step, real_next, real_step = 18, trainer.loader.next_batch, trainer.train_step

    def next_batch():
        x, y = real_next()
        if trainer.step == bad_step:
            g = torch.Generator().manual_seed(0)
            return torch.randint(0, 50257, x.shape, generator=g, dtype=x.dtype), torch.full_like(y, 47123)
        return x, y

    seen = {}

    def step():
        snap = lambda: ([p.detach().clone() for p in trainer.model.parameters()],  # noqa: E731
                        [s[k].clone() for s in trainer.optimizer.state.values() for k in ("momentum_buffer", "step") if k in s])
        before = snap()
        row = real_step()
        after = snap()
        seen[row["step"]] = all(torch.equal(a, b) for part in (0, 1) for a, b in zip(before[part], after[part]))
        return row

    monkeypatch.setattr(trainer.loader, "next_batch", next_batch)
    monkeypatch.setattr(trainer, "train_step", step)
    res = trainer.run()
    skipped = [r for r in metrics(tmp_path / "run") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [bad_step] and res.step == 20
    assert seen[bad_step] and not any(seen[s] for s in seen if s != bad_step)


class TwoSizeGPU:
    """Device memory as micro-batch auto's trial steps see it: the trial at 8 sequences peaks over
    the margin, the one at 4 fits (fit.py's CUDA path, simulated on the CPU)."""

    def __init__(self):
        self.peaks, self.size = {8: 95 << 30, 4: 50 << 30}, None

    def name(self) -> str:
        return "simulated"

    def total(self) -> int:
        return 100 << 30

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return self.peaks[self.size]

    def release(self) -> None:
        pass


def test_micro_batch_auto_trials_leave_muon_as_fresh(monkeypatch):
    """fit.py's trial steps run MuonAdamW.step() (momentum buffers, AdamW moments) and then clear
    its state: the first real step afterwards equals a fresh optimizer's, bit for bit."""
    from gptforge.device import Runtime
    from gptforge.training import fit
    from gptforge.training.distributed import DistEnv

    gpu, real_batch = TwoSizeGPU(), fit._batch

    def batch(model, b, seq_len, device):
        gpu.size = b
        return real_batch(model, b, seq_len, device)

    monkeypatch.setattr(fit, "device_memory", lambda device: gpu)
    monkeypatch.setattr(fit, "_batch", batch)
    cfg = C.resolve(None, [("optim.name", "muon"), ("optim.batch_tokens", "256"), ("optim.micro_batch_size", "auto"),
                           ("data.seq_len", "32"), ("model.preset", "nano")])
    torch.manual_seed(0)
    model = GPT(preset("nano", vocab_size=256))
    fresh = copy.deepcopy(model)
    opt = make_optimizer(model, cfg.optim, CPU, "muon")
    micro = fit.choose(cfg, model, model, opt, Runtime.make("cpu", "fp32"), DistEnv(), 32)
    assert micro.size == 4 and "8 peaked at 95.0 GiB" in micro.reason  # both trials ran a step
    assert not opt.state and opt.muon.state is opt.state and opt.adamw.state is opt.state
    x = torch.randint(0, 256, (4, 32))
    for m, o in ((model, opt), (fresh, make_optimizer(fresh, cfg.optim, CPU, "muon"))):
        _, loss = m(x, x)
        loss.backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


# ------------------------------------------------------------------ DDP
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:resuming the RNG states")  # no dropout here: the masks do not matter
def test_ddp_on_two_gloo_ranks_equals_one_process_and_resumes_in_one(tmp_path, shards_dir):
    """`torchrun --nproc_per_node 2` (DDP, micro-batch 4 each) against one process with micro-batch
    8: the same global batch, gradients all-reduced before Muon sees them, so the same losses; its
    checkpoint (Muon's momentum included) resumes in one process on the same trajectory. The
    tolerance is 10x DDP's with AdamW (tests/test_distributed.py): the all-reduce sums in another
    order, and Muon's Newton-Schulz runs in bf16, where those last-bit differences can round apart
    (seen: 1.05e-5 at step 3). A run on half the batch (what one rank alone
    sees) logs losses 0.13 to 0.4 away from step 1 on (measured)."""
    over = {"data.order": "shuffle", "optim.batch_tokens": "512", "run.max_steps": "4", "run.ckpt_every": "2",
            "run.sample_tokens": "0"}
    single = train(muon_cfg(tmp_path / "single", shards_dir, **over, **{"optim.micro_batch_size": 8}), progress=False)
    run = tmp_path / "ddp"
    flags = [a for k, v in {**NANO, **over, "data.dir": str(shards_dir), "run.dir": str(run)}.items() for a in (f"--{k}", v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptforge",
           "train", *flags]
    import os

    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("optimizer muon: 8 matrices") == 1 and "world size 2" in p.stdout
    ddp = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    assert sorted(ddp) == [0, 1, 2, 3]
    for s in ddp:
        assert math.isclose(ddp[s], single.losses[s], rel_tol=0, abs_tol=1e-4), f"step {s}: {ddp[s]} vs {single.losses[s]}"
    mid = ckpt.checkpoints_dir(run) / ckpt.step_dir_name(2)
    resumed = train(muon_cfg(tmp_path / "one", shards_dir, **over, **{"optim.micro_batch_size": 8}), resume=str(mid),
                    progress=False)
    for s in (2, 3):
        assert math.isclose(resumed.losses[s], ddp[s], rel_tol=0, abs_tol=1e-4), f"step {s}"


# ------------------------------------------------------------------ training/muon.py: ours against torch, the variants
from gptforge.training import muon as M  # noqa: E402


def nesterov(g: torch.Tensor, buf: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.Muon's documented momentum: B <- mu B + (1 - mu) g (lerp form), update g + mu (B - g)."""
    buf = mu * buf + (1 - mu) * g
    return g + mu * (buf - g), buf


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_our_muon_is_torch_muon_bitwise_over_10_steps(adjust):
    """training/muon.Muon with no variant against torch.optim.Muon on the blocks' matrices of a small
    model, 10 steps of real gradients: the parameters and momentum buffers are equal bit for bit, and
    the state dicts have the same keys (a checkpoint moves between the two)."""
    torch.manual_seed(0)
    a = GPT(preset("nano"))
    b = copy.deepcopy(a)
    mats = lambda m: [p for n, p in m.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]  # noqa: E731
    ours = M.Muon(mats(a), lr=0.03, momentum=0.9, weight_decay=0.05, adjust_lr_fn=adjust)
    ref = torch.optim.Muon(mats(b), lr=0.03, momentum=0.9, weight_decay=0.05, adjust_lr_fn=adjust)
    for step in range(10):
        x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(step))
        for model in (a, b):
            model.zero_grad(set_to_none=True)
            model(x, x)[1].backward()
        for o in (ours, ref):
            o.param_groups[0]["lr"] = 0.03 * (1 - step / 10)
            o.step()
        for p, q in zip(mats(a), mats(b)):
            assert torch.equal(p, q), f"step {step}"
            assert torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    sa, sb = ours.state_dict(), ref.state_dict()
    assert sa["param_groups"][0].keys() == sb["param_groups"][0].keys() and sa["state"][0].keys() == sb["state"][0].keys()


def test_polar_express_is_the_papers_iteration_and_closer_to_orthogonal():
    """Amsel et al.'s per-iteration coefficients, written out here from the paper (as nanochat uses
    them), applied as X <- aX + (bA + cA^2)X, A = XX^T, from X / (1.01 ||X|| + 1e-6), in float64:
    ours (bf16, as torch's Newton-Schulz, whose rounding the first iteration's large coefficients
    amplify) is within 10% of it in Frobenius norm, where torch's quintic is over 20% away; and its singular values end nearer 1 (torch's leaves some near 0.7)."""
    coeffs = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
    torch.manual_seed(1)
    for shape in ((16, 8), (8, 32)):
        g = torch.randn(*shape)
        x = g.double().T if shape[0] > shape[1] else g.double()
        x = x / (x.norm() * 1.01 + 1e-6)
        for a, b, c in coeffs:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        want = x.T if shape[0] > shape[1] else x
        got = M.orthogonalize(g, "polar_express")
        assert got.dtype == torch.bfloat16 and got.shape == g.shape
        off = lambda t: float((t.double() - want).norm() / want.norm())  # noqa: E731
        assert off(got) < 0.1 and off(M.orthogonalize(g)) > 0.2, (off(got), off(M.orthogonalize(g)))
        sv = torch.linalg.svdvals(got.double())
        assert 0.8 < sv.min() and sv.max() < 1.2
        assert torch.linalg.svdvals(M.orthogonalize(g).double()).min() < 0.8


def step_one(w0: torch.Tensor, grads: list[torch.Tensor], **kw) -> tuple[torch.Tensor, M.Muon]:
    w = torch.nn.Parameter(w0.clone())
    opt = M.Muon([w], **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt


@pytest.mark.parametrize("shape", [(8, 4), (4, 8)])
def test_normuon_normalizes_each_neuron_by_its_running_second_moment(shape):
    """Two steps against the formula: O the orthogonalized Nesterov update, v <- 0.95 v + 0.05
    mean(O^2) over the columns (tall: one per row) or rows (wide: one per column), the step
    O / sqrt(v) rescaled to ||O||_F, times the adjusted lr."""
    torch.manual_seed(2)
    w0, gs = torch.randn(*shape), [torch.randn(*shape) for _ in range(2)]
    lr, mu = 0.1, 0.9
    got, opt = step_one(w0, gs, lr=lr, momentum=mu, weight_decay=0.0, variant=M.MuonVariant(normuon=True))
    dim = 1 if shape[0] >= shape[1] else 0
    w, v, buf = w0.clone(), torch.zeros(()), torch.zeros(shape)
    for g in gs:
        u, buf = nesterov(g, buf, mu)
        o = M.orthogonalize(u).float()
        v = 0.95 * v + 0.05 * (o ** 2).mean(dim=dim, keepdim=True)
        s = o / v.sqrt()
        w = w - lr * math.sqrt(max(1, shape[0] / shape[1])) * s * (o.norm() / s.norm())
    torch.testing.assert_close(got, w, atol=1e-6, rtol=1e-6)
    assert opt.state[opt.param_groups[0]["params"][0]]["normuon_v"].shape == ((shape[0], 1) if dim == 1 else (1, shape[1]))


def test_cautious_weight_decay_decays_only_where_update_and_weight_agree():
    """p <- p (1 - lr wd [O p >= 0]) - lr' O: the decay is skipped where the update would move the
    weight away from zero."""
    torch.manual_seed(3)
    w0, g = torch.randn(6, 6), torch.randn(6, 6)
    lr, wd, mu = 0.1, 0.5, 0.95
    got, _ = step_one(w0, [g], lr=lr, momentum=mu, weight_decay=wd, variant=M.MuonVariant(cautious_wd=True))
    o = M.orthogonalize(nesterov(g, torch.zeros(6, 6), mu)[0])
    mask = (o.float() * w0 >= 0).float()
    assert 0 < mask.sum() < mask.numel()  # both cases occur
    torch.testing.assert_close(got, w0 * (1 - lr * wd * mask) - lr * o.float(), atol=1e-6, rtol=1e-6)
    plain, _ = step_one(w0, [g], lr=lr, momentum=mu, weight_decay=wd)
    assert not torch.equal(got, plain)


def test_momentum_warmup_ramps_from_085_to_the_target():
    """mu_t = 0.85 + (mu - 0.85) min(t / W, 1) at step t (from 0): the buffer and the update follow it."""
    torch.manual_seed(4)
    w0, gs = torch.randn(4, 6), [torch.randn(4, 6) for _ in range(5)]
    got, opt = step_one(w0, gs, lr=0.05, momentum=0.95, weight_decay=0.0, variant=M.MuonVariant(momentum_warmup=4))
    w, buf = w0.clone(), torch.zeros(4, 6)
    for t, g in enumerate(gs):
        mu = 0.85 + (0.95 - 0.85) * min(t / 4, 1)
        u, buf = nesterov(g, buf, mu)
        w = w - 0.05 * M.orthogonalize(u).float()
    torch.testing.assert_close(got, w, atol=1e-6, rtol=1e-6)
    state = opt.state[opt.param_groups[0]["params"][0]]
    torch.testing.assert_close(state["momentum_buffer"], buf, atol=1e-6, rtol=1e-6)
    assert float(state["step"]) == 5
    assert [M.warmup_momentum(0.95, t, 4) for t in (0, 2, 4, 9)] == pytest.approx([0.85, 0.9, 0.95, 0.95], abs=1e-12)


def test_variant_state_round_trips_through_the_optimizer_state_dict():
    """Every variant on: 2 steps, the state dict into a fresh MuonAdamW (as resume does), 2 more
    steps: the same parameters bit for bit as 4 steps uninterrupted; the variants come from optim.*."""
    args = muon_args(muon_ns="polar_express", muon_normuon=True, muon_cautious_wd=True, muon_momentum_warmup=3,
                     muon_weight_decay=0.1)
    torch.manual_seed(5)
    a = untied_nano()
    b = copy.deepcopy(a)
    oa, ob = make_optimizer(a, args, CPU, "muon"), make_optimizer(b, args, CPU, "muon")
    assert oa.muon.variant == M.MuonVariant("polar_express", True, True, 3)
    assert "(ns polar_express, normuon, cautious wd, momentum warmup 3)" in describe(oa, args)
    for step in range(4):
        if step == 2:
            fresh = make_optimizer(b, args, CPU, "muon")
            saved = copy.deepcopy(ob.state_dict())
            assert all({"momentum_buffer", "normuon_v", "step"} <= set(saved["state"][i])
                       for i in range(len(ob.param_groups[0]["params"])))
            fresh.load_state_dict(saved)
            ob = fresh
        x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(step))
        for model, o in ((a, oa), (b, ob)):
            model(x, x)[1].backward()
            o.step()
            o.zero_grad(set_to_none=True)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), step


def test_no_variant_keeps_the_banner_and_state_of_torch_muon():
    opt = make_optimizer(untied_nano(), muon_args(), CPU, "muon")
    assert opt.muon.variant == M.MuonVariant() and describe(opt, muon_args()).split(" | ")[0].endswith("adjust_lr original")
    assert M.NS_COEFFICIENTS == (3.4445, -4.775, 2.0315) and M.NS_STEPS == 5 and M.EPS == 1e-7  # read from torch.optim.Muon


def test_split_treats_each_stacked_matrix_as_its_own_parameter_of_torch_muon():
    """optim.muon_split: a step on the modern model's fused c_attn (q, k, v) and SwiGLU c_fc (gate, up)
    equals torch.optim.Muon stepping each stacked matrix as a separate parameter (own orthogonalization,
    own shape's lr adjustment) with the same gradients, 3 steps bit for bit; the others unchanged."""
    torch.manual_seed(0)
    model = GPT(preset("nano", recipe="modern"))
    args = muon_args(muon_split=True, muon_lr=0.03, muon_weight_decay=0.05)
    opt = make_optimizer(model, args, CPU, "muon")
    assert "split fused matrices" in describe(opt, args)
    fused = model.fused_matrices()
    assert fused["transformer.h.0.attn.c_attn.weight"] == 3 and fused["transformer.h.0.mlp.c_fc.weight"] == 2
    mats = {n: p for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    # the reference: each block a leaf of its own, updated by torch.optim.Muon
    blocks = {n: [b.detach().clone().requires_grad_() for b in p.detach().chunk(fused.get(n, 1))] for n, p in mats.items()}
    ref = torch.optim.Muon([b for bs in blocks.values() for b in bs], lr=0.03, momentum=0.95, weight_decay=0.05)
    for step in range(3):
        x = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(step))
        model.zero_grad(set_to_none=True)
        model(x, x)[1].backward()
        for n, p in mats.items():
            for b, g in zip(blocks[n], p.grad.chunk(fused.get(n, 1))):
                b.grad = g.clone()
        opt.step()
        ref.step()
        for n, p in mats.items():
            assert torch.equal(p.detach(), torch.cat([b.detach() for b in blocks[n]])), (n, step)
