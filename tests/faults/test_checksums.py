"""Flipped bytes that leave every file valid: a checkpoint's SHA256SUMS and the manifest's shard
digests catch them. `--resume auto` falls back to the newest intact checkpoint (the damaged one is
kept), every other reader refuses with one line naming the file and both digests, training refuses
a changed shard before its first step; and a data directory moved after prepare still trains and
verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptforge.checkpoint import SUMS, ChecksumError, load_model, read_sums, save_model, verify_dir
from gptforge.data import prepare as prep
from gptforge.data.verify import cache_path, verify_shards
from gptforge.errors import GPTForgeError
from gptforge.model import GPT, GPTConfig

from .conftest import assert_one_line_error, flags, losses_by_step, run_cli, tree_digest
from .test_hostile_files import data, header_len, latest, poke, run, trained_run  # noqa: F401 (fixtures)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The verified-shards cache of each test in its own place (not the user's ~/.cache)."""
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flip_weight_byte(path: Path) -> tuple[str, str]:
    """Flip one bit inside the tensor data of a safetensors file (still a valid file).
    Returns (recorded digest, digest now)."""
    want = read_sums(path.parent)[path.name]
    n = int.from_bytes(path.read_bytes()[:8], "little")  # header length; the tensors follow it
    poke(path, 8 + n + 1001, lambda b: b ^ 0x10)
    return want, sha(path)


def flip_state_byte(path: Path) -> tuple[str, str]:
    want = read_sums(path.parent)[path.name]
    poke(path, path.stat().st_size // 2, lambda b: b ^ 0x01)
    return want, sha(path)


def ckpts(run: Path) -> Path:
    return run / "checkpoints"


# ------------------------------------------------------------------------------ checkpoints


def test_every_checkpoint_file_is_in_its_sums(run, tmp_path):
    for d in sorted(ckpts(run).iterdir()):
        assert sorted(read_sums(d)) == ["config.json", "model.safetensors", "state.pt"]
        assert all(read_sums(d)[f] == sha(d / f) for f in read_sums(d))
    if shutil.which("sha256sum"):  # the coreutils format: checkable without gptforge
        subprocess.run(["sha256sum", "--quiet", "-c", SUMS], cwd=latest(run), check=True)
    out = save_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=128)), tmp_path / "m")
    assert sorted(read_sums(out)) == ["config.json", "model.safetensors"]
    load_model(out)


def test_flipped_weight_byte_resume_auto_falls_back(run, trained_run, gf):
    want, got = flip_weight_byte(latest(run) / "model.safetensors")
    damaged = tree_digest(latest(run))
    r = gf("train", "--resume", "auto", "--run.dir", str(run), "--run.max_steps", "4")
    assert r.returncode == 0, r.stderr
    warning = next(line for line in r.stderr.splitlines() if "skipping damaged checkpoint step_000003" in line)
    for m in ("step_000003/model.safetensors", want, got, "left in place"):
        assert m in warning, warning
    assert "resuming from step_000002" in r.stderr and "resumed from" in r.stdout and "step_000002 at step 2" in r.stdout
    # from step 2 the run is the uninterrupted one again, bitwise
    assert losses_by_step(run)[2] == losses_by_step(trained_run)[2]
    # the damaged checkpoint was never deleted: the save of step 3 put it aside first
    assert tree_digest(ckpts(run) / "step_000003.damaged") == damaged
    assert "kept the damaged checkpoint step_000003 as step_000003.damaged" in r.stderr
    verify_dir(latest(run))
    verify_dir(ckpts(run) / "step_000004")


def test_flipped_weight_byte_sample_eval_export_refuse(run, shards_dir, gf, tmp_path):
    want, got = flip_weight_byte(latest(run) / "model.safetensors")
    before = tree_digest(run)
    for target in (run, latest(run)):  # a run dir (its newest checkpoint) and the checkpoint itself
        mentions = ("step_000003/model.safetensors", want, got)
        assert_one_line_error(gf("sample", str(target), "--max-new-tokens", "4", "--device", "cpu"), "sample", *mentions)
        assert_one_line_error(gf("eval", str(target), "--data", str(shards_dir), "--no-progress", "--device", "cpu"),
                              "eval", *mentions)
        assert_one_line_error(gf("export", str(target), "--to-hf", str(tmp_path / "hf")), "export", *mentions)
        assert not (tmp_path / "hf").exists()
    # explicit --resume of it: an error, not a fallback
    assert_one_line_error(gf("train", "--resume", str(latest(run)), "--run.dir", str(run)), "train", *mentions)
    # model.init_from and Python callers: GPT.from_pretrained, with and without overrides
    for overrides in ({}, {"dropout": 0.1}):
        with pytest.raises(ChecksumError, match=got):
            GPT.from_pretrained(str(run), **overrides)
    assert tree_digest(run) == before


def test_flipped_state_byte(run, trained_run, gf):
    want, got = flip_state_byte(latest(run) / "state.pt")
    before = tree_digest(run)
    assert_one_line_error(gf("train", "--resume", str(latest(run)), "--run.dir", str(run)), "train",
                          "step_000003/state.pt", want, got)
    assert tree_digest(run) == before
    # sample / eval / export read no state.pt: the model files are intact, so they work
    assert gf("sample", str(run), "--max-new-tokens", "2", "--device", "cpu").returncode == 0
    r = gf("train", "--resume", "auto", "--run.dir", str(run), "--run.max_steps", "3")
    assert r.returncode == 0, r.stderr
    assert "skipping damaged checkpoint step_000003" in r.stderr and "state.pt" in r.stderr and got in r.stderr
    assert losses_by_step(run)[2] == losses_by_step(trained_run)[2]
    assert (ckpts(run) / "step_000003.damaged").is_dir()


def test_no_intact_checkpoint_is_an_error(run, gf):
    for d in sorted(ckpts(run).iterdir()):
        flip_weight_byte(d / "model.safetensors")
    before = tree_digest(run)
    r = gf("train", "--resume", "auto", "--run.dir", str(run))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [line.split("checkpoint ")[1].split(":")[0] for line in lines[:-1]] == ["step_000003", "step_000002", "step_000001"]
    assert lines[-1].startswith("gptforge train: error: --resume auto: no intact checkpoint in ")
    assert "(and 2 more damaged)" in lines[-1]
    assert tree_digest(run) == before


def test_checkpoint_without_sums_loads_with_a_note(run, gf):
    for d in ckpts(run).iterdir():
        (d / SUMS).unlink()
    r = gf("sample", str(run), "--max-new-tokens", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("no SHA256SUMS") == 1 and "step_000003 has no SHA256SUMS" in r.stderr
    r = gf("train", "--resume", "auto", "--run.dir", str(run), "--run.max_steps", "4")
    assert r.returncode == 0, r.stderr  # (the note was given once in this process already)
    assert sorted(read_sums(ckpts(run) / "step_000004")) == ["config.json", "model.safetensors", "state.pt"]


def test_malformed_sums_file(run, gf):
    (latest(run) / SUMS).write_text("not a digest  model.safetensors\n")
    assert_one_line_error(gf("sample", str(latest(run)), "--device", "cpu"), "sample", "step_000003/SHA256SUMS", "line 1")


# ------------------------------------------------------------------------------ shards


def test_shard_verification_is_remembered(data):
    before = tree_digest(data)
    n = sum(len(b["shards"]) for b in json.loads((data / "manifest.json").read_text())["splits"].values())
    first = verify_shards(data, progress=False)
    assert (first["hashed"], first["cached"]) == (n, 0)
    again = verify_shards(data, progress=False)
    assert (again["hashed"], again["cached"], again["bytes_hashed"]) == (0, n, 0)
    assert tree_digest(data) == before  # the cache is kept outside the data directory
    assert cache_path(data).is_file()

    touched = data / "train_000001.npy"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert verify_shards(data, progress=False)["hashed"] == 1

    # a flipped byte written with the old mtime put back still changes ctime: hashed again, caught
    shard = data / "train_000002.npy"
    st = shard.stat()
    tokens = np.load(shard)
    i = int(np.flatnonzero(tokens < 40000)[10])
    poke(shard, header_len(shard) + 2 * i, lambda b: b ^ 0x01)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_mtime_ns == st.st_mtime_ns and shard.stat().st_size == st.st_size
    with pytest.raises(GPTForgeError, match=r"train_000002\.npy: sha256 is [0-9a-f]{64}, but manifest.json says"):
        verify_shards(data, progress=False)
    with pytest.raises(GPTForgeError, match="train_000002.npy"):  # a failure is never remembered as verified
        verify_shards(data, progress=False)


def test_cache_from_another_data_dir_is_not_trusted(data, tmp_path):
    verify_shards(data, progress=False)
    other = tmp_path / "copy"
    shutil.copytree(data, other)  # same names, sizes (and with copytree, mtimes)
    poke(other / "val_000000.npy", header_len(other / "val_000000.npy") + 3, lambda b: b ^ 0x01)
    with pytest.raises(GPTForgeError, match="val_000000.npy: sha256"):
        verify_shards(other, progress=False)
    assert cache_path(other).is_file()  # its other shards were verified
    shutil.rmtree(other)
    os.utime(data / "val_000000.npy")
    verify_shards(data, progress=False)  # writing a cache forgets the data dirs that are gone
    assert cache_path(data).is_file() and not cache_path(other).exists()


def test_moved_data_dir_trains_and_verifies(tmp_path, corpus_dir, gf):
    a = tmp_path / "a"
    shutil.copytree(corpus_dir, a / "corpus")
    prep.prepare([str(a / "corpus")], a / "data", shard_tokens=8192, val_tokens=4096, workers=1, progress=False)
    text = (a / "data" / "manifest.json").read_text()
    m = json.loads(text)
    assert m["sources"] == ["../corpus"] and m["options"]["sources"] == ["../corpus"]
    assert str(tmp_path) not in text  # nothing of the preparing machine's paths
    # the data dir moved, its sources not: preparing the same sources into it again is already done
    os.rename(a / "data", a / "moved-data")
    assert prep.prepare([str(a / "corpus")], a / "moved-data", shard_tokens=8192, val_tokens=4096, workers=1,
                        progress=False) == m
    # the whole tree copied elsewhere (as a shared dataset travels): verifies and trains there
    b = tmp_path / "elsewhere" / "b"
    b.parent.mkdir()
    os.rename(a, b)
    p = run_cli("prepare", "--verify", str(b / "moved-data"))
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr
    r = gf("train", *flags(tmp_path / "run", b / "moved-data", **{"run.max_steps": 1, "run.ckpt_every": 0}))
    assert r.returncode == 0, r.stderr
    assert cache_path(b / "moved-data").is_file()  # verified, in its new place


def test_old_manifest_with_absolute_sources_still_reads(tmp_path, corpus_dir):
    out = tmp_path / "data"
    prep.prepare([str(corpus_dir)], out, shard_tokens=8192, val_tokens=4096, workers=1, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    m["sources"] = m["options"]["sources"] = [str(corpus_dir.resolve())]  # as gptforge wrote them before
    (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    before = tree_digest(out)
    assert prep.prepare([str(corpus_dir)], out, shard_tokens=8192, val_tokens=4096, workers=1, progress=False) == m
    assert verify_shards(out, progress=False)["hashed"] > 0
    assert tree_digest(out) == before


def test_portable_paths(tmp_path, monkeypatch):
    home = tmp_path / "home" / "alice"
    (home / "corpus").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    shared = tmp_path / "shared" / "data"
    assert prep.portable_path(home / "corpus", shared) == "~/corpus"  # the data dir is not in that home
    assert prep.portable_path(home / "corpus", home / "data" / "tiny") == "../../corpus"
    assert prep.portable_path(tmp_path / "shared" / "raw", shared) == "../raw"
    assert prep.portable_path("/", shared) == "/"  # nothing shared below the root: absolute, as given


# ------------------------------------------------------------------------------ under torchrun


@pytest.mark.slow
def test_changed_shard_stops_every_rank_under_torchrun(data, tmp_path):
    shard = data / "train_000003.npy"
    tokens = np.load(shard)
    i = int(np.flatnonzero(tokens < 40000)[100])
    poke(shard, header_len(shard) + 2 * i, lambda b: b ^ 0x01)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptforge",
           "train", *flags(tmp_path / "run", data, **{"run.max_steps": 2, "run.ckpt_every": 0})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode != 0
    assert "train_000003.npy: sha256 is" in p.stderr, p.stderr[-3000:]  # rank 0, which hashed
    assert "shard verification failed on another rank" in p.stderr, p.stderr[-3000:]  # rank 1 was told, not left waiting
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_strict_sha256sums_format_for_every_directory(tmp_path):
    """fsutil.read_sums reads what sha256sum writes (text and binary mode) and nothing else."""
    from gptforge import fsutil

    digest = hashlib.sha256(b"x").hexdigest()
    fsutil.write_sums(tmp_path, {"b.json": digest, "a.bin": digest})
    assert (tmp_path / SUMS).read_text() == f"{digest}  a.bin\n{digest}  b.json\n"
    assert fsutil.read_sums(tmp_path) == {"a.bin": digest, "b.json": digest}
    (tmp_path / SUMS).write_text(f"{digest} *sub/c.bin\n")
    assert fsutil.read_sums(tmp_path) == {"sub/c.bin": digest}
    for bad, why in ((f"{digest.upper()}  a.bin", "is not"), (f"{digest[:-1]}  a.bin", "is not"), (f"{digest}\ta.bin", "is not"),
                     (f"{digest}  a.bin\n{digest}  a.bin", "a second time"), (f"{digest}  ../a.bin", "outside"),
                     (f"{digest}  /etc/passwd", "outside"), (f"{digest}  sub/../../a.bin", "outside")):
        (tmp_path / SUMS).write_text(bad + "\n")
        with pytest.raises(GPTForgeError, match=rf"SHA256SUMS: line \d .*{why}"):
            fsutil.read_sums(tmp_path)
    (tmp_path / SUMS).unlink()
    assert fsutil.read_sums(tmp_path) is None
