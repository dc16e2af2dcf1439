"""Export of models no built-in transformers architecture computes, as a transformers directory
with gptforge's own modeling file (interop.remote, `trust_remote_code`): transformers loads it in a
process where gptforge cannot be imported, with the same logits (<= 1e-4, fp32) and the same greedy
generation as gptforge; gptforge reads it back (load, import-hf) and re-exports it."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import subprocess
import sys

import pytest
import torch

from gptforge.checkpoint import load_model
from gptforge.errors import GPTForgeError
from gptforge.interop import remote
from gptforge.interop.export import export_hf
from gptforge.interop.load import load_pretrained
from gptforge.model import GPT, RECIPES, GPTConfig
from gptforge.sampling import generate

NANO = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)
PROMPT = [464, 318, 257, 1332]
NEW = 16

# Models no built-in class computes: the modern recipe with a softcap and ReLU^2 (tied and untied,
# a padded vocabulary), learned positions with RMSNorm, QK-norm and the manual attention, and
# nanochat's techniques all on.
CASES = {
    "softcap_relu2": dict(mlp="relu2", softcap=15.0, pad_vocab=True),
    "softcap_relu2_tied": dict(mlp="relu2", softcap=30.0, tie_embeddings=True),
    "learned_positions_manual": dict(rope=False, attention="manual", softcap=10.0),
    # nanochat's architecture whole: NanoChatForCausalLM has none of its value embeddings, lambdas,
    # smear or backout, so only our own modeling file computes it
    "nanochat_techniques": dict(mlp="relu2", softcap=15.0, norm_gain=False, embed_norm=True, value_embeds="alternate",
                                resid_lambdas=True, x0_lambdas=True, smear=True, backout=True),
}

# Loads each exported directory with transformers, gptforge made unimportable first (a meta-path
# finder that refuses it: the editable install and PYTHONPATH both stay out), and saves the logits
# and greedy generations.
LOADER = r"""
import importlib.abc, json, sys
class NoGptforge(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "gptforge" or name.startswith("gptforge."):
            raise ImportError("gptforge is blocked in this process")
sys.meta_path.insert(0, NoGptforge())
try:
    import gptforge
    sys.exit("gptforge was importable")
except ImportError:
    pass
import torch, transformers
x, prompt, new, out, dirs = torch.load(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
res = {}
for d in dirs:
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(x).logits
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    res[d] = dict(logits=logits, ids=ids[0, len(prompt):].tolist(), cls=type(hf).__name__,
                  tok=transformers.AutoTokenizer.from_pretrained(d).encode("def f():"))
    hf.save_pretrained(d + "-resaved")  # what a user who fine-tunes it in transformers writes
assert not any(m == "gptforge" or m.startswith("gptforge.") for m in sys.modules), "gptforge was imported"
torch.save(res, out)
"""


def nano(seed: int = 0, std: float = 0.2, **overrides) -> GPT:
    """A nano model of the modern recipe under `overrides`, weights perturbed off init."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**RECIPES["modern"], **NANO, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def tokens(n: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{case: (model, directory)} and what transformers computed on each, without gptforge."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("remote")
    models = {name: nano(**fields) for name, fields in CASES.items()}
    dirs = {name: export_hf(m, root / name) for name, m in models.items()}
    torch.save(tokens(), root / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(root / "hf_modules")  # transformers copies the modeling files here
    p = subprocess.run([sys.executable, "-c", LOADER, str(root / "x.pt"), json.dumps(PROMPT), str(NEW), str(root / "res.pt"),
                        *map(str, dirs.values())], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = torch.load(root / "res.pt", weights_only=True)
    return {name: (models[name], dirs[name], res[str(dirs[name])]) for name in CASES}


@pytest.mark.parametrize("case", CASES)
def test_transformers_without_gptforge_computes_the_same(exported, case):
    model, out, theirs = exported[case]
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "gptforge" and hf_cfg["architectures"] == ["GPTForgeForCausalLM"]
    assert set(hf_cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert hf_cfg["gptforge"] == model.config.to_dict()  # every field, whatever switches exist
    assert {"model.py", "modeling_gptforge.py", "configuration_gptforge.py"} <= {p.name for p in out.iterdir()}
    assert theirs["cls"] == "GPTForgeForCausalLM"
    with torch.no_grad():
        diff = (theirs["logits"] - model(tokens())[0]).abs().max().item()
    assert diff <= 1e-4
    assert theirs["ids"] == generate(model, PROMPT, NEW, temperature=0, stop_at_eot=False)
    assert theirs["tok"] == [4299, 277, 33529]


def test_the_modeling_code_is_gptforges_model_file(exported):
    _, out, _ = exported["softcap_relu2"]
    assert (out / "model.py").read_bytes() == (remote.PACKAGE / "model.py").read_bytes()
    assert set(remote.code_files()) == {p.name for p in out.glob("*.py")}


@pytest.mark.parametrize("case", CASES)
def test_gptforge_reads_the_export_back(exported, case):
    model, out, _ = exported[case]
    back = load_pretrained(out)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.tied == model.tied


@pytest.mark.parametrize("case", CASES)
def test_gptforge_reads_what_transformers_saved_again(exported, case):
    model, out, _ = exported[case]
    back = load_pretrained(f"{out}-resaved")
    assert back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(tokens())[0], model(tokens())[0])


def test_import_hf_and_export_again_cli(exported, tmp_path):
    model, out, _ = exported["softcap_relu2"]
    p = subprocess.run([sys.executable, "-m", "gptforge", "import-hf", str(out), "--out", str(tmp_path / "ck")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    back = load_model(tmp_path / "ck")
    assert back.config == model.config
    p = subprocess.run([sys.executable, "-m", "gptforge", "export", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "GPTForgeForCausalLM" in p.stderr and "trust_remote_code" in p.stderr
    again = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(again(tokens())[0], model(tokens())[0])


def test_built_in_architectures_still_win(tmp_path):
    out = export_hf(nano(mlp="swiglu", softcap=0.0), tmp_path / "qwen3")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    assert not (out / "modeling_gptforge.py").exists()


def test_a_damaged_gptforge_config_is_one_line(exported, tmp_path):
    _, out, _ = exported["softcap_relu2"]
    hf_cfg = json.loads((out / "config.json").read_text())
    for bad, match in ((None, "needs the object 'gptforge'"), ({**hf_cfg["gptforge"], "n_layr": 2}, "unknown GPTConfig keys"),
                       ({**hf_cfg["gptforge"], "mlp": "tanh"}, "model.mlp must be one of")):
        d = tmp_path / "bad"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({**hf_cfg, "gptforge": bad}))
        with pytest.raises(GPTForgeError, match=match) as e:
            load_pretrained(d)
        assert "\n" not in str(e.value) and "config.json" in str(e.value)
