"""Checkpoints and initial weights stay what they were.

tests/fixtures/model_compat/ was written by the code before the model files were merged (one
GPT-2 class, one modern class): `gpt2/` and `modern/` are `save_model` directories of nano models
(2 layers, 2 heads, 32 channels, 16 positions, 64 tokens, weights moved off init), whose config.json
has the layouts of that code (GPT-2: no `arch` key; modern: `arch: "modern"` and its switches);
reference_logits.safetensors holds a fixed input and each model's logits for it; init_sha256.json
the sha256 of the parameters a fixed seed gave each preset at construction.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gptforge
from gptforge.checkpoint import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "model_compat"
NANO = dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_checkpoints_of_the_old_layouts_load_with_the_same_logits(name):
    ref = load_file(str(FIXTURES / "reference_logits.safetensors"))
    for model in (gptforge.load(FIXTURES / name), load_model(FIXTURES / name).eval()):
        with torch.no_grad():
            logits = model(ref["idx"])[0]
        assert torch.allclose(logits, ref[f"{name}_logits"], rtol=0, atol=1e-6)


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def _build(name: str):
    from gptforge.model import GPT, RECIPES, GPTConfig

    return GPT(GPTConfig(**{**RECIPES[name], **NANO}))


@pytest.mark.parametrize("name", ["gpt2", "modern"])
def test_a_fixed_seed_gives_the_same_initial_weights(name):
    torch.manual_seed(1337)
    assert _digest(_build(name)) == json.loads((FIXTURES / "init_sha256.json").read_text())[name]
