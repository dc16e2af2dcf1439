"""Hostile model files and settings, each answered by one line before anything is allocated,
written or unpickled: a checkpoint whose config.json is far bigger than its weights, an HF index
pointing outside its directory, fields of the wrong type, a state.pt of the wrong structure, HF
configs with zero heads, a pickle posing as pytorch_model.bin, an in-loop evaluation whose data is
missing (found before step 0, not at its first evaluation), an unknown plot format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge import cli
from gptforge import config as C
from gptforge.checkpoint import write_sums
from gptforge.training.trainer import train

from .conftest import NANO, assert_one_line_error, cli_env, flags, tree_digest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shards_dir) -> Path:
    run = tmp_path_factory.mktemp("hostile_inputs") / "run"
    over = dict(NANO, **{"data.dir": str(shards_dir), "run.dir": str(run), "run.max_steps": "2",
                         "run.ckpt_every": "1", "run.sample_tokens": "0"})
    train(C.resolve(None, list(over.items())), progress=False)
    return run


@pytest.fixture
def run(tmp_path, trained_run) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, trained_run) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert cli.main(["export", str(trained_run), "--to-hf", str(out)]) == 0
    return out


def ckpt_of(run: Path) -> Path:
    return run / "checkpoints" / "step_000002"


def edit_config(ckpt: Path, fn) -> None:
    """Change a checkpoint's config.json and rewrite its sums, as a deliberate tamperer would."""
    path = ckpt / "config.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))
    write_sums(ckpt)


def limited_cli(*args: str, gib: int = 6) -> subprocess.CompletedProcess:
    """The CLI with its address space capped: a model allocated from a lying config.json fails
    fast here instead of taking the machine's memory."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
            "from gptforge import cli; sys.exit(cli.main(sys.argv[1:]))").format(gib << 30)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=cli_env())


# ------------------------------------------------------------------------------ item 7


def test_config_json_bigger_than_its_weights_is_refused_before_allocation(tmp_path, run):
    def grow(meta):
        for section in (meta["model"], meta["train"]["model"]):
            section.update(n_layer=200, n_embd=8192)

    edit_config(ckpt_of(run), grow)
    before = tree_digest(run)
    p = limited_cli("export", str(ckpt_of(run)), "--to-hf", str(tmp_path / "hf"))
    assert_one_line_error(p, "export", "step_000002/model.safetensors", "n_layer")
    p = limited_cli("sample", str(ckpt_of(run)), "--device", "cpu", "--max-new-tokens", "2")
    assert_one_line_error(p, "sample", "step_000002/model.safetensors")
    p = limited_cli("train", "--resume", str(ckpt_of(run)), "--run.max_steps", "3")
    assert_one_line_error(p, "train", "step_000002/model.safetensors")
    assert tree_digest(run) == before


def test_train_section_bigger_than_the_weights_is_refused_before_allocation(run):
    """The run's config on resume is the checkpoint's `train` section: it cannot make the trainer
    build a bigger model than the weights either."""
    edit_config(ckpt_of(run), lambda meta: meta["train"]["model"].update(n_layer=200, n_embd=8192))
    before = tree_digest(run)
    p = limited_cli("train", "--resume", str(ckpt_of(run)), "--run.max_steps", "3")
    assert_one_line_error(p, "train", "step_000002", "architecture")
    assert tree_digest(run) == before


# ------------------------------------------------------------------------------ item 9


def test_missing_hellaswag_data_is_found_before_step_0(tmp_path, shards_dir, gf):
    run = tmp_path / "run"
    missing = tmp_path / "nowhere" / "hellaswag_val.jsonl"
    r = gf("train", *flags(run, shards_dir, **{"run.max_steps": 4, "run.ckpt_every": 2, "run.hellaswag_every": 2,
                                               "run.hellaswag_path": str(missing)}))
    assert_one_line_error(r, "train", str(missing))
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()


def test_unknown_in_loop_task_is_found_before_step_0(tmp_path, shards_dir, gf):
    run = tmp_path / "run"
    r = gf("train", *flags(run, shards_dir, **{"run.max_steps": 4, "run.ckpt_every": 2, "run.eval_every": 4,
                                               "run.eval_tasks": "no_such_task"}))
    assert_one_line_error(r, "train", "no_such_task")
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()


def test_missing_tracker_is_found_before_step_0(tmp_path, shards_dir, gf, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    run = tmp_path / "run"
    r = gf("train", *flags(run, shards_dir, **{"run.max_steps": 2, "run.log": "wandb"}))
    assert_one_line_error(r, "train", "wandb")
    assert not (run / "checkpoints").exists()


# ------------------------------------------------------------------------------ item 10


@pytest.mark.parametrize("escape", ["../outside.safetensors", "ABSOLUTE"])
def test_hf_index_pointing_outside_its_directory_is_refused(tmp_path, hf_dir, gf, escape):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    outside = tmp_path / "outside.safetensors"
    (src / "model.safetensors").rename(outside)
    from safetensors import safe_open

    with safe_open(str(outside), "pt") as f:
        keys = list(f.keys())
    shard = str(outside) if escape == "ABSOLUTE" else escape
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in keys}}))
    r = gf("import-hf", str(src), "--out", str(tmp_path / "ckpt"))
    assert_one_line_error(r, "import-hf", "model.safetensors.index.json", shard)
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------------ item 12


@pytest.mark.parametrize("field, value", [("n_layer", "two"), ("n_embd", 64.5), ("n_head", [2]), ("bias", "yes"),
                                          ("dropout", "none")])
def test_checkpoint_config_field_of_the_wrong_type(tmp_path, run, gf, field, value):
    edit_config(ckpt_of(run), lambda meta: meta["model"].__setitem__(field, value))
    r = gf("export", str(ckpt_of(run)), "--to-hf", str(tmp_path / "hf"))
    assert_one_line_error(r, "export", "step_000002/config.json", field)


def test_checkpoint_config_section_of_the_wrong_type(tmp_path, run, gf):
    edit_config(ckpt_of(run), lambda meta: meta.__setitem__("step", "late"))
    edit_config(ckpt_of(run), lambda meta: meta.__setitem__("train", ["not", "a", "table"]))
    r = gf("train", "--resume", str(ckpt_of(run)), "--run.max_steps", "3")
    assert_one_line_error(r, "train", "step_000002/config.json", "train")


def test_state_pt_of_the_wrong_structure(run, gf):
    for state in ({"step": 2}, [1, 2, 3], {"step": "two", "optimizer": {}, "rng": [], "loader": []}):
        torch.save(state, ckpt_of(run) / "state.pt")
        write_sums(ckpt_of(run))
        before = tree_digest(run)
        r = gf("train", "--resume", str(ckpt_of(run)), "--run.max_steps", "3")
        assert_one_line_error(r, "train", "step_000002/state.pt")
        assert tree_digest(run) == before


@pytest.mark.parametrize("field, value", [("n_head", 0), ("n_layer", 0), ("n_head", True), ("n_embd", -32),
                                          ("layer_norm_epsilon", "tiny"), ("n_positions", 0), ("vocab_size", 0),
                                          ("n_inner", "wide")])
def test_hf_gpt2_config_of_the_wrong_type(tmp_path, hf_dir, gf, field, value):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    meta = json.loads((src / "config.json").read_text())
    meta[field] = value
    (src / "config.json").write_text(json.dumps(meta))
    r = gf("import-hf", str(src), "--out", str(tmp_path / "ckpt"))
    assert_one_line_error(r, "import-hf", "config.json", field)


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("hidden_size", 0), ("rms_norm_eps", "tiny"),
                                          ("num_attention_heads", "4"), ("rope_theta", "big")])
def test_hf_qwen3_config_of_the_wrong_type(tmp_path, gf, field, value):
    from gptforge.interop.export import export_hf
    from gptforge.model import GPT, RECIPES, GPTConfig

    src = tmp_path / "src"
    export_hf(GPT(GPTConfig(**RECIPES["modern"], block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=64)), src)
    meta = json.loads((src / "config.json").read_text())
    meta[field] = value
    (src / "config.json").write_text(json.dumps(meta))
    r = gf("import-hf", str(src), "--out", str(tmp_path / "ckpt"))
    assert_one_line_error(r, "import-hf", "config.json", field)


def test_pickle_as_pytorch_model_bin_is_one_line_and_never_run(tmp_path, hf_dir):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"transformer.wte.weight": torch.zeros(1), "x": Boom()}, src / "pytorch_model.bin")
    p = subprocess.run([sys.executable, "-m", "gptforge", "import-hf", str(src), "--out", str(tmp_path / "ckpt")],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert_one_line_error(p, "import-hf", "pytorch_model.bin")
    assert not marker.exists(), "the pickle was executed"


def test_plot_to_an_unknown_format(tmp_path, run, gf):
    out = tmp_path / "p.xyz"
    r = gf("plot", str(run), "--out", str(out))
    assert_one_line_error(r, "plot", "p.xyz", "png", "svg", "pdf")
    assert not out.exists()
