"""AdamW groups and the warmup + cosine schedule."""

import math

import pytest
import torch

from gptforge.config import OptimArgs
from gptforge.model import GPT, preset
from gptforge.training.optim import lr_at, make_optimizer, param_groups


def test_decay_only_on_matrices():
    model = GPT(preset("nano"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # every parameter exactly once (the tied head/embedding counted once)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    # wte, wpe, and per block c_attn, attn.c_proj, c_fc, mlp.c_proj weights
    assert len(decay["params"]) == 2 + 4 * model.config.n_layer


def test_optimizer_hyperparameters():
    args = OptimArgs(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    opt = make_optimizer(GPT(preset("nano")), args, torch.device("cpu"))
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == 6e-4


def test_lr_at_key_steps():
    args = OptimArgs(lr=6e-4, min_lr_ratio=0.1, warmup_steps=10, decay_steps=110, schedule="cosine")
    assert lr_at(0, args, 200) == pytest.approx(6e-5)  # (0+1)/10 of max
    assert lr_at(9, args, 200) == pytest.approx(6e-4)  # end of warmup
    assert lr_at(10, args, 200) == pytest.approx(6e-4)  # cosine starts at max
    assert lr_at(60, args, 200) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half way
    assert lr_at(110, args, 200) == pytest.approx(6e-5)  # decayed to min
    assert lr_at(150, args, 200) == pytest.approx(6e-5)  # stays at min
    lrs = [lr_at(s, args, 200) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_decay_steps_default_to_max_steps():
    args = OptimArgs(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, decay_steps=0, schedule="cosine")
    assert lr_at(50, args, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, args, 100) == 0.0
