"""Adding a model switch means adding a field to GPTConfig: config keys, `gptforge train --help`,
checkpoints and Hugging Face export all follow from its fields. Each test enumerates them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from gptforge import config as C
from gptforge.checkpoint import load_model, save_model
from gptforge.errors import GPTForgeError
from gptforge.model import GPT, RECIPES, SWITCHES, GPTConfig

SIZE = dict(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)
OTHER = {bool: lambda v: not v, float: lambda v: v * 2 if v else 15.0,
         str: lambda v: {"layernorm": "rmsnorm", "rmsnorm": "layernorm", "gelu": "relu2", "swiglu": "relu2", "relu2": "gelu",
                             "off": "alternate", "alternate": "all", "all": "off"}[v]}
CASES = [(recipe, key) for recipe in RECIPES for key in SWITCHES]


def changed(recipe: str, key: str) -> GPTConfig:
    base = RECIPES[recipe][key]
    return GPTConfig(**{**RECIPES[recipe], **SIZE, key: OTHER[type(base)](base)}).validate()


def test_switches_are_the_config_fields_marked_so_and_gpt2_is_the_default():
    marked = [f.name for f in dataclasses.fields(GPTConfig) if f.metadata.get("switch")]
    assert list(SWITCHES) == marked and "norm_eps" in SWITCHES and "softcap" in SWITCHES
    assert all(set(values) == set(SWITCHES) for values in RECIPES.values())
    assert GPTConfig().recipe == "gpt2" and GPTConfig(**RECIPES["modern"]).recipe == "modern"


@pytest.mark.parametrize("recipe,key", CASES)
def test_config_keys_follow(recipe, key):
    assert key in {f.name for f in dataclasses.fields(C.ModelArgs)}
    want = changed(recipe, key)
    cfg = C.resolve(None, [("model.preset", "nano"), ("model.arch", recipe), (f"model.{key}", str(getattr(want, key)).lower())])
    assert getattr(cfg.model.gpt_config(), key) == getattr(want, key)
    assert C.resolve(None, [("model.arch", recipe)]).model.gpt_config().recipe == recipe


def test_cli_help_follows():
    out = subprocess.run([sys.executable, "-m", "gptforge", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for f in dataclasses.fields(GPTConfig):
        if f.name in SWITCHES:
            assert f"--model.{f.name}" in text
            assert " ".join(f.metadata["help"].split())[:40] in text, f.name


@pytest.mark.parametrize("recipe,key", CASES)
def test_checkpoint_round_trip_follows(tmp_path, recipe, key):
    config = changed(recipe, key)
    torch.manual_seed(0)
    model = GPT(config).eval()
    save_model(model, tmp_path / "ck")
    back = load_model(tmp_path / "ck").eval()
    assert back.config == config
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])


@pytest.mark.parametrize("recipe,key", CASES)
def test_export_follows(tmp_path, recipe, key):
    """Each switch value is exported and read back as itself, or refused by an error that names
    the keys to change. zero_init only decides the initial weights, which an export does not keep."""
    from gptforge.interop.export import export_hf
    from gptforge.interop.load import load_pretrained

    config = changed(recipe, key)
    torch.manual_seed(0)
    model = GPT(config).eval()
    try:
        out = export_hf(model, tmp_path / "hf")
    except GPTForgeError as e:
        assert "not exportable to Hugging Face" in str(e) and "model." in str(e)
        assert not (tmp_path / "hf").exists()
        return
    back = load_pretrained(out)
    # not kept by a format: zero_init (initial weights only), rope_base without rope (unused),
    # no bias (GPT-2 stores zeros)
    unkept = {"zero_init"} | ({"rope_base"} if not config.rope else set()) | ({"bias"} if back.config.recipe == "gpt2" else set())
    keep = [k for k in SWITCHES if k not in unkept]
    assert {k: getattr(back.config, k) for k in keep} == {k: getattr(config, k) for k in keep}
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert (back(x)[0] - model(x)[0]).abs().max() < 1e-5
