"""Export as transformers' built-in NanoChatForCausalLM: a model with nanochat's base components
(ReLU^2, parameter-free RMSNorm, a norm after the embedding, QK-norm, RoPE, optional softcap)
loads in transformers with the same logits (<= 1e-4, fp32) and greedy continuation, and reads
back into gptforge unchanged; nanochat's newer techniques are refused by name."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from gptforge.errors import GPTForgeError
from gptforge.interop import nanochat
from gptforge.interop.export import export_hf
from gptforge.interop.load import load_pretrained
from gptforge.model import GPT, RECIPES, GPTConfig
from gptforge.sampling import generate

NANO = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
NANOCHAT = dict(norm_gain=False, embed_norm=True, mlp="relu2")  # on top of the modern recipe


def model(seed: int = 0, std: float = 0.2, **overrides) -> GPT:
    """A nano model of nanochat's base components, weights moved off init."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**RECIPES["modern"], **NANO, **NANOCHAT, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def tokens(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("softcap", [0.0, 15.0])
@pytest.mark.parametrize("tie", [False, True])
def test_export_parity_with_transformers_nanochat(tmp_path, softcap, tie):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "NanoChatForCausalLM"):
        pytest.skip("this transformers has no NanoChatForCausalLM")
    m = model(softcap=softcap, tie_embeddings=tie, pad_vocab=True)
    out = export_hf(m, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["NanoChatForCausalLM"] and cfg["hidden_act"] == "relu2"
    assert cfg["final_logit_softcapping"] == (softcap or None) and cfg["tie_word_embeddings"] is tie
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "NanoChatForCausalLM"
    x = tokens(32)
    with torch.no_grad():
        assert (hf(x).logits - m(x)[0]).abs().max().item() <= 1e-4
    prompt = [464, 318, 257, 1332]
    ours = generate(m, prompt, 16, temperature=0, stop_at_eot=False)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, 4:].tolist()
    assert ours == theirs
    back = load_pretrained(out)  # import-hf's reader
    assert {k: getattr(back.config, k) for k in nanochat.COMPUTES} == nanochat.COMPUTES
    assert back.config.softcap == softcap and back.tied is tie
    with torch.no_grad():
        assert (back(x)[0] - m(x)[0]).abs().max() < 1e-5


def test_the_rotation_convention_is_converted_not_ignored():
    """transformers' NanoChat turns q and k by -theta: without the half swap the logits differ."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "NanoChatForCausalLM"):
        pytest.skip("this transformers has no NanoChatForCausalLM")
    m = model()
    state, cfg = nanochat.weights_out(m)
    for i in range(m.config.n_layer):  # undo the swap: our weights as they are
        for p in "qk":
            key = f"model.layers.{i}.self_attn.{p}_proj.weight"
            state[key] = nanochat.swap_halves(state[key], m.config.n_head)
    hf = transformers.NanoChatForCausalLM(transformers.NanoChatConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    hf.load_state_dict(state, strict=False)
    x = tokens(16)
    with torch.no_grad():
        assert (hf.eval()(x).logits - m(x)[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("switch,named", [
    (dict(value_embeds="alternate"), "model.value_embeds=alternate (to off)"),
    (dict(resid_lambdas=True, x0_lambdas=True), "model.resid_lambdas=true (to false), model.x0_lambdas=true (to false)"),
    (dict(smear=True), "model.smear=true (to false)"),
    (dict(backout=True), "model.backout=true (to false)"),
    (dict(norm_gain=True), "model.norm_gain=true (to false)"),
])
def test_techniques_transformers_lacks_are_named(tmp_path, switch, named):
    m = model(**switch)
    assert named in ", ".join(nanochat.problems(m.config))
    try:
        export_hf(m, tmp_path / "hf")
    except GPTForgeError as e:  # refused, or written in a format that computes the model (not NanoChat)
        assert "not exportable" in str(e)
        return
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] != "nanochat"


def test_import_refuses_what_it_does_not_compute(tmp_path):
    cfg = nanochat.hf_config(model().config)
    with pytest.raises(GPTForgeError, match="hidden_act 'gelu'"):
        nanochat.config_from_hf({**cfg, "hidden_act": "gelu"}, "x/config.json")
    with pytest.raises(GPTForgeError, match="grouped-query attention"):
        nanochat.config_from_hf({**cfg, "num_key_value_heads": 1}, "x/config.json")
    assert nanochat.config_from_hf(cfg, "x/config.json") == GPTConfig(**{**RECIPES["modern"], **NANO, **NANOCHAT})
