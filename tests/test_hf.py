"""Hugging Face interop: reading HF directories in their several forms, shape checks, export files
that transformers loads offline (model and tokenizer), the CLI, and the exported model in a
transformers text-generation pipeline agreeing with `gptforge sample --temperature 0`."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptforge import cli
from gptforge.checkpoint import load_model, save_model
from gptforge.errors import GPTForgeError
from gptforge.sampling import generate
from gptforge.interop.export import export_hf
from gptforge.interop.gpt2 import hf_state_dict
from gptforge.interop.load import load_pretrained
from gptforge.model import GPT, GPTConfig, preset
from gptforge.tokenizer import Tokenizer, bpe_files
from helpers import randomize

transformers = pytest.importorskip("transformers")

TINY = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=4, n_embd=32)




@pytest.fixture(scope="module")
def model() -> GPT:
    return randomize(GPT(GPTConfig(**TINY)))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "out"
    export_hf(model, out)
    return out


def logits(m: GPT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)[0]


X = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))


def write_hf_dir(directory, state, config: dict, weights="model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        save_file(state, str(directory / weights))
    else:
        torch.save(state, directory / weights)
    return directory


# --- reading ----------------------------------------------------------------------------------


def test_old_style_bin_without_prefix_with_buffers(tmp_path, model, exported):
    """The original GPT-2 checkpoints: no `transformer.` prefix, causal-mask buffers, a stored
    lm_head, pickled .bin (read with weights_only=True)."""
    state = {k.removeprefix("transformer."): v for k, v in hf_state_dict(model).items()}
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    config = json.loads((exported / "config.json").read_text())
    src = write_hf_dir(tmp_path / "old", state, config, weights="pytorch_model.bin")
    torch.testing.assert_close(logits(load_pretrained(src), X), logits(model, X), atol=0, rtol=0)


def test_sharded_safetensors(tmp_path, model, exported):
    state = hf_state_dict(model)
    names = sorted(state)
    src = tmp_path / "sharded"
    src.mkdir()
    (src / "config.json").write_text((exported / "config.json").read_text())
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(src / shard))
        weight_map.update({k: shard for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(logits(load_pretrained(src), X), logits(model, X), atol=0, rtol=0)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, model, exported):
    state = hf_state_dict(model)
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)
    src = write_hf_dir(tmp_path / "bad", state, json.loads((exported / "config.json").read_text()))
    with pytest.raises(GPTForgeError, match=r"tensor transformer\.h\.1\.mlp\.c_fc\.weight has shape \(32, 100\), expected \(32, 128\)"):
        load_pretrained(src)


def test_missing_tensor_and_untied_head(tmp_path, model, exported):
    config = json.loads((exported / "config.json").read_text())
    state = hf_state_dict(model)
    del state["transformer.ln_f.bias"]
    with pytest.raises(GPTForgeError, match=r"missing \['transformer\.ln_f\.bias'\]"):
        load_pretrained(write_hf_dir(tmp_path / "a", state, config))
    state = hf_state_dict(model)
    state["lm_head.weight"] = torch.zeros_like(state["transformer.wte.weight"])
    with pytest.raises(GPTForgeError, match="lm_head.weight differs"):
        load_pretrained(write_hf_dir(tmp_path / "b", state, config))


def test_not_a_gpt2(tmp_path, model, exported):
    config = json.loads((exported / "config.json").read_text())
    with pytest.raises(GPTForgeError, match="model_type is 'mistral'; only 'gpt2' .* 'qwen3' and 'llama'"):
        load_pretrained(write_hf_dir(tmp_path / "a", {}, {**config, "model_type": "mistral"}))
    with pytest.raises(GPTForgeError, match="activation_function 'relu'"):
        load_pretrained(write_hf_dir(tmp_path / "b", {}, {**config, "activation_function": "relu"}))


def test_bin_with_pickled_objects_is_refused(tmp_path, exported):
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text((exported / "config.json").read_text())
    torch.save({"x": torch.zeros(1), "obj": GPTConfig()}, src / "pytorch_model.bin")
    with pytest.raises(GPTForgeError, match="weights_only"):
        load_pretrained(src)


def test_overrides_pad_vocab_and_crop(exported, model):
    padded = load_pretrained(exported, pad_vocab=True)
    assert padded.transformer.wte.weight.shape == (50304, 32)
    torch.testing.assert_close(logits(padded, X), logits(model, X))
    cropped = load_pretrained(exported, block_size=16)
    assert cropped.transformer.wpe.weight.shape == (16, 32)
    torch.testing.assert_close(logits(cropped, X[:, :16]), logits(model, X[:, :16]))
    with pytest.raises(GPTForgeError, match=r"cannot override \['n_layer'\]"):
        load_pretrained(exported, n_layer=3)
    with pytest.raises(GPTForgeError, match="exceeds the checkpoint's 32"):
        load_pretrained(exported, block_size=64)


def test_hub_name_offline_asks_for_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./gpt2 directory shadows the name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(GPTForgeError, match="offline.*pass a local directory"):
        load_pretrained("gpt2")


def test_via_gpt_from_pretrained(exported, model):
    torch.testing.assert_close(logits(GPT.from_pretrained(str(exported)), X), logits(model, X), atol=0, rtol=0)


# --- writing ----------------------------------------------------------------------------------


def test_export_files(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == sorted([
        "config.json", "model.safetensors", "generation_config.json",
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    ])
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_positions"], config["n_ctx"], config["n_embd"], config["n_layer"], config["n_head"]) == (32, 32, 32, 2, 4)
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert config["bos_token_id"] == config["eos_token_id"] == 50256
    assert "lm_head.weight" not in load_file(str(exported / "model.safetensors"))  # tied, stored once
    vocab_bpe, encoder_json = bpe_files()
    assert (exported / "vocab.json").read_bytes() == encoder_json.read_bytes()
    assert (exported / "merges.txt").read_bytes() == vocab_bpe.read_bytes()


def test_exported_tokenizer_loads_offline(exported):
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = "Hello world, naïve café 🦙 <|endoftext|>"
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(text)["input_ids"] == Tokenizer().encode(text, allow_eot=True)
    assert tok.eos_token_id == 50256 and tok.model_max_length == 32
    assert tok.decode(Tokenizer().encode(text, allow_eot=True)) == text


def test_export_refuses_to_overwrite_and_writes_atomically(tmp_path, model):
    out = tmp_path / "out"
    export_hf(model, out)
    with pytest.raises(GPTForgeError, match="already exists"):
        export_hf(model, out)
    other = randomize(GPT(GPTConfig(**TINY)), seed=9)
    export_hf(other, out, overwrite=True)
    torch.testing.assert_close(logits(load_pretrained(out), X), logits(other, X), atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or .old leftovers


def test_cli_import_and_export_round_trip(tmp_path, model, exported, capsys):
    assert cli.main(["import-hf", str(exported), "--out", str(tmp_path / "ck"), "--pad-vocab"]) == 0
    ck = load_model(tmp_path / "ck")
    assert ck.config.pad_vocab and ck.transformer.wte.weight.shape[0] == 50304
    torch.testing.assert_close(logits(ck, X), logits(model, X))
    assert cli.main(["export", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(X).logits - logits(model, X)).abs().max().item() <= 1e-4
    unpadded = load_pretrained(tmp_path / "ck", pad_vocab=False)
    assert unpadded.transformer.wte.weight.shape[0] == 50257
    torch.testing.assert_close(logits(unpadded, X), logits(model, X))
    assert cli.main(["export", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["import-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_export_accepts_a_run_directory(tmp_path, model):
    save_model(model, tmp_path / "run" / "checkpoints" / "step_000050")
    assert cli.main(["export", str(tmp_path / "run"), "--to-hf", str(tmp_path / "hf")]) == 0
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "hf"), X), logits(model, X), atol=0, rtol=0)


# --- issue 6: the exported model in the transformers pipeline ---------------------------------


def test_pipeline_greedy_equals_gptforge_sample(tmp_path, capsys):
    """Export, then transformers.pipeline("text-generation") offline: its greedy continuation is
    the text `gptforge sample --temperature 0` prints, and the token ids of our generate."""
    ours = randomize(GPT(preset("nano")), seed=4)
    save_model(ours, tmp_path / "ck")
    assert cli.main(["export", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")]) == 0
    prompt = "The quick brown fox"
    n = 24
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    theirs = pipe(prompt, max_new_tokens=n, do_sample=False, return_full_text=True)[0]["generated_text"]

    capsys.readouterr()
    assert cli.main(["sample", str(tmp_path / "ck"), "--prompt", prompt, "--max-new-tokens", str(n),
                     "--temperature", "0", "--device", "cpu", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert printed == theirs + "\n"
    assert cli.main(["sample", str(tmp_path / "hf"), "--prompt", prompt, "--max-new-tokens", str(n),
                     "--temperature", "0", "--device", "cpu", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out == printed  # sampling straight from the HF directory

    ids = generate(ours, Tokenizer().encode(prompt), n, temperature=0)
    hf_ids = pipe.model.generate(
        torch.tensor([Tokenizer().encode(prompt)]), max_new_tokens=n, do_sample=False
    )[0, len(Tokenizer().encode(prompt)) :].tolist()
    assert ids == hf_ids
