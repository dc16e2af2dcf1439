"""Torn and hostile files: each is answered with a one-line error that names the file or field and
a non-zero exit, and no file is lost or replaced (the data and run directories hash the same
before and after).

Most commands run in-process through `gptforge.cli.main` (the code path of the console script,
minus the interpreter start); the ones where a real process matters (exit status, a pickle that
must never execute) run as subprocesses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge import cli
from gptforge.checkpoint import write_sums
from gptforge import config as C
from gptforge.training.trainer import train

from .conftest import NANO, assert_one_line_error, flags, run_cli, tree_digest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shards_dir) -> Path:
    """A nano run of 3 steps with checkpoints step_000001..3 (made once, copied by each test)."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    over = dict(NANO, **{"data.dir": str(shards_dir), "run.dir": str(run), "run.max_steps": "3",
                         "run.ckpt_every": "1", "run.keep_last": "3"})
    train(C.resolve(None, list(over.items())), progress=False)
    return run


@pytest.fixture
def run(tmp_path, trained_run) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


@pytest.fixture
def data(tmp_path, shards_dir) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(shards_dir, dst)
    return dst


def latest(run: Path) -> Path:
    return run / "checkpoints" / "step_000003"


def header_len(path: Path) -> int:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def poke(path: Path, offset: int, fn) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] = fn(raw[offset])
    path.write_bytes(bytes(raw))


def train_args(run: Path, data: Path, steps: int = 2) -> list[str]:
    return ["train", *flags(run, data, **{"run.max_steps": steps, "run.ckpt_every": 0})]


# ------------------------------------------------------------------------------ shards


def test_truncated_shard(tmp_path, data, gf, trained_run):
    shard = data / "train_000001.npy"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    before = tree_digest(data)

    p = run_cli("prepare", "--verify", str(data))
    assert_one_line_error(p, "prepare", "train_000001.npy", "truncated")
    fresh = tmp_path / "fresh-run"
    assert_one_line_error(gf(*train_args(fresh, data)), "train", "train_000001.npy", "truncated")
    assert not fresh.exists() or tree_digest(fresh) == {}
    assert_one_line_error(gf("eval", str(trained_run), "--data", str(data), "--split", "train", "--no-progress"),
                          "eval", "train_000001.npy", "truncated")
    assert tree_digest(data) == before


def test_flipped_header_byte_is_caught_on_open(tmp_path, data, gf):
    shard = data / "train_000002.npy"
    text = shard.read_bytes()[: header_len(shard)]
    pos = text.index(b"'shape': (") + len(b"'shape': (")
    poke(shard, pos, lambda b: ord("9") if b != ord("9") else ord("8"))  # 8192 tokens -> 9192
    before = tree_digest(data)
    fresh = tmp_path / "fresh-run"
    line = assert_one_line_error(gf(*train_args(fresh, data)), "train", "train_000002.npy", "manifest.json")
    assert "holds" in line or "bytes" in line
    assert tree_digest(data) == before
    poke(shard, 0, lambda b: b ^ 0xFF)  # the magic itself
    before = tree_digest(data)
    assert_one_line_error(gf(*train_args(fresh, data)), "train", "train_000002.npy", "not a valid .npy")
    assert not fresh.exists() or tree_digest(fresh) == {}
    p = run_cli("prepare", "--verify", str(data))
    assert_one_line_error(p, "prepare", "train_000002.npy")
    assert tree_digest(data) == before


def test_flipped_payload_byte_is_caught_by_verify_and_by_train(tmp_path, data, gf):
    """A bit flipped inside the token payload keeps the size and header: only a sha256 sees it.
    `prepare --verify` and training (before its first step) both hash; `--data.verify off`
    trains on the one changed token id, as before."""
    shard = data / "train_000003.npy"
    off = header_len(shard)
    tokens = np.load(shard)
    i = int(np.flatnonzero(tokens < 40000)[100])  # a token whose flipped low bit stays in the vocabulary
    poke(shard, off + 2 * i, lambda b: b ^ 0x01)
    before = tree_digest(data)
    p = run_cli("prepare", "--verify", str(data))
    assert_one_line_error(p, "prepare", "train_000003.npy", "sha256")
    fresh = tmp_path / "fresh-run"
    assert_one_line_error(gf(*train_args(fresh, data)), "train", "train_000003.npy", "sha256",
                          "--data.verify off")
    assert not fresh.exists()  # stopped before the first step: no run dir, no metrics
    r = gf(*train_args(tmp_path / "r", data, steps=1), "--data.verify", "off")
    assert r.returncode == 0, r.stderr
    assert tree_digest(data) == before


def test_token_id_beyond_the_vocabulary(tmp_path, data, gf):
    """A flipped high byte can make an id >= 50257: verify names it; training refuses the batch
    with a one-line error instead of an IndexError from the embedding."""
    for shard in sorted(data.glob("train_*.npy")):  # in every window, so the first batch meets one
        off = header_len(shard)
        n = (shard.stat().st_size - off) // 2
        for i in range(0, n, 16):
            poke(shard, off + 2 * i + 1, lambda b: 0xFF)
    before = tree_digest(data)
    p = run_cli("prepare", "--verify", str(data))
    assert_one_line_error(p, "prepare", "train_000000.npy", "vocabulary size 50257")
    fresh = tmp_path / "fresh-run"
    line = assert_one_line_error(gf(*train_args(fresh, data)), "train")
    assert "50257" in line or "vocab" in line, line
    assert tree_digest(data) == before


def test_manifest_that_lies_about_counts(tmp_path, data, gf):
    manifest = data / "manifest.json"
    m = json.loads(manifest.read_text())
    m["splits"]["train"]["shards"][0]["num_tokens"] -= 192
    manifest.write_text(json.dumps(m, indent=2))
    before = tree_digest(data)
    p = run_cli("prepare", "--verify", str(data))
    assert_one_line_error(p, "prepare", "train_000000.npy", "manifest.json")
    fresh = tmp_path / "fresh-run"
    assert_one_line_error(gf(*train_args(fresh, data)), "train", "train_000000.npy", "manifest.json")
    assert not fresh.exists() or tree_digest(fresh) == {}
    assert tree_digest(data) == before


def test_manifest_that_lies_about_documents_or_split_totals(data):
    manifest = data / "manifest.json"
    good = manifest.read_text()
    m = json.loads(good)
    m["splits"]["train"]["shards"][1]["num_documents"] += 3
    manifest.write_text(json.dumps(m, indent=2))
    p = run_cli("prepare", "--verify", str(data))
    assert_one_line_error(p, "prepare", "train_000001.npy", "documents")
    m = json.loads(good)
    m["splits"]["train"]["num_tokens"] += 1000
    manifest.write_text(json.dumps(m, indent=2))
    p = run_cli("prepare", "--verify", str(data))
    assert_one_line_error(p, "prepare", "num_tokens")


# ------------------------------------------------------------------------------ checkpoints


def cut_short(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def test_safetensors_cut_short_resume(run, shards_dir):
    """An explicit --resume of it is an error (--resume auto falls back: see test_checksums.py)."""
    cut_short(latest(run) / "model.safetensors")
    before = tree_digest(run)
    p = run_cli("train", "--resume", str(latest(run)), "--run.dir", str(run), "--run.max_steps", "5")  # a real process: exit 1
    assert_one_line_error(p, "train", "step_000003/model.safetensors", "sha256")
    assert tree_digest(run) == before


@pytest.mark.parametrize("keep", [0.5, 0.0001])  # cut inside the tensors / inside the header
def test_safetensors_cut_short_sample_and_eval(run, shards_dir, gf, keep):
    cut_short(latest(run) / "model.safetensors", keep)
    before = tree_digest(run)
    for target in (run, latest(run)):  # a run dir (its newest checkpoint) and the checkpoint itself
        assert_one_line_error(gf("sample", str(target), "--max-new-tokens", "4", "--device", "cpu"),
                              "sample", "step_000003/model.safetensors")
        assert_one_line_error(gf("eval", str(target), "--data", str(shards_dir), "--no-progress", "--device", "cpu"),
                              "eval", "step_000003/model.safetensors")
    assert tree_digest(run) == before


class Boom:
    """Unpickling this calls open(marker, "w"): code execution, if anything ever unpickles it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_state(path: Path, marker: Path) -> None:
    good = torch.load(path, weights_only=True)
    good["optimizer"]["payload"] = Boom(marker)  # hidden deep inside an otherwise valid state
    torch.save(good, path)


def test_pickle_carrying_code_in_state_is_refused(run, tmp_path):
    # the payload is live: an unrestricted torch.load would run it
    probe_marker, probe = tmp_path / "probe-marker", tmp_path / "probe.pt"
    shutil.copy(latest(run) / "state.pt", probe)
    evil_state(probe, probe_marker)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "pwned"
    evil_state(latest(run) / "state.pt", marker)
    p = run_cli("train", "--resume", str(latest(run)), "--run.dir", str(run), "--run.max_steps", "5")
    assert_one_line_error(p, "train", "step_000003/state.pt", "sha256")  # the sums catch it before any unpickling
    assert not marker.exists(), "the pickle in state.pt was executed"
    write_sums(latest(run))  # a deliberate tamperer rewrites the sums too: the safe loader still refuses
    before = tree_digest(run)
    p = run_cli("train", "--resume", "auto", "--run.dir", str(run), "--run.max_steps", "5")
    assert_one_line_error(p, "train", "step_000003/state.pt", "refused")
    assert not marker.exists(), "the pickle in state.pt was executed"
    assert tree_digest(run) == before


def test_state_pt_cut_short(run, gf):
    cut_short(latest(run) / "state.pt")
    before = tree_digest(run)
    assert_one_line_error(gf("train", "--resume", str(latest(run)), "--run.dir", str(run)), "train",
                          "step_000003/state.pt", "sha256")
    (latest(run) / "SHA256SUMS").unlink()  # a checkpoint from before the sums: torch.load's own error
    r = gf("train", "--resume", str(latest(run)), "--run.dir", str(run))
    assert r.returncode == 1 and "no SHA256SUMS" in r.stderr, r.stderr
    assert "step_000003/state.pt: unreadable training state" in r.stderr.strip().splitlines()[-1]


def test_torn_checkpoint_config_json(run, gf):
    cfg = latest(run) / "config.json"
    cfg.write_text(cfg.read_text()[:50])
    before = tree_digest(run)
    assert_one_line_error(gf("train", "--resume", str(latest(run)), "--run.dir", str(run)), "train", "step_000003/config.json")
    assert_one_line_error(gf("sample", str(latest(run)), "--device", "cpu"), "sample", "step_000003/config.json")
    assert tree_digest(run) == before


# ------------------------------------------------------------------------------ configs


BAD_CONFIGS = [
    ("typo'd key", "[optim]\nlearnig_rate = 1e-3\n", ["optim.learnig_rate", "valid keys", "lr"]),
    ("typo'd section", "[optimizer]\nlr = 1e-3\n", ["[optimizer]", "optim"]),
    ("string for int", '[run]\nmax_steps = "ten"\n', ["run.max_steps", "int", "'ten'"]),
    ("float for int", "[model]\nn_layer = 2.5\n", ["model.n_layer", "int"]),
    ("int for bool", "[optim]\nspike_guard = 3\n", ["optim.spike_guard", "bool"]),
    ("string for float", '[optim]\nlr = "fast"\n', ["optim.lr", "float"]),
    ("table for a value", "[run]\nmax_steps = { n = 1 }\n", ["run.max_steps"]),
    ("value for a table", 'optim = "fast"\n', ["[optim]"]),
    ("negative batch", "[optim]\nbatch_tokens = -4096\n", ["optim.batch_tokens", "-4096"]),
    ("negative micro-batch", "[optim]\nmicro_batch_size = -2\n", ["optim.micro_batch_size"]),  # 0 is auto
    ("zero steps", "[run]\nmax_steps = 0\n", ["run.max_steps"]),
    ("zero layers", "[model]\nn_layer = 0\n", ["n_layer"]),
    ("negative width", "[model]\nn_embd = -64\n", ["n_embd"]),
    ("negative lr", "[optim]\nlr = -1e-3\n", ["optim.lr"]),
    ("nan lr", "[optim]\nlr = nan\n", ["optim.lr"]),
    ("negative seq_len", "[data]\nseq_len = -1\n", ["data.seq_len"]),
    ("zero keep_last", "[run]\nkeep_last = 0\n", ["run.keep_last"]),
    ("seq_len beyond block_size", "[data]\nseq_len = 4096\n", ["data.seq_len", "block_size"]),
    ("heads do not divide width", "[model]\nn_head = 5\n", ["n_head"]),
    ("batch does not divide", "[optim]\nbatch_tokens = 1000\nmicro_batch_size = 3\n", ["optim.batch_tokens", "multiple"]),
    ("not TOML", "[optim\nlr = 1\n", ["bad.toml", "not valid TOML"]),
]


@pytest.mark.parametrize("content,mentions", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_file(tmp_path, shards_dir, gf, content, mentions):
    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    data_before = tree_digest(shards_dir)
    rd = tmp_path / "run"
    r = gf("train", "--config", str(bad), "--run.dir", str(rd), "--data.dir", str(shards_dir), "--run.device", "cpu")
    assert_one_line_error(r, "train", *mentions)
    assert not rd.exists()
    assert tree_digest(shards_dir) == data_before


@pytest.mark.parametrize("override,mentions", [
    (["--run.max_steps", "ten"], ["--run.max_steps", "int"]),
    (["--optim.lr", "-1"], ["optim.lr"]),
    (["--optim.micro_batch_size", "-4"], ["optim.micro_batch_size"]),
    (["--optim.batch_tokens", "300"], ["optim.batch_tokens", "multiple"]),
    (["--optim.spike_lr_factor", "0"], ["spike_lr_factor"]),
    (["--data.dirr", "x"], ["data.dirr", "valid keys"]),
    (["--run.max_steps"], ["--run.max_steps needs a value"]),
])
def test_bad_override_on_resume_leaves_the_run_untouched(run, gf, override, mentions):
    before = tree_digest(run)
    r = gf("train", "--resume", "auto", "--run.dir", str(run), *override)
    assert_one_line_error(r, "train", *mentions)
    assert tree_digest(run) == before
