"""gptforge prepare: round trip, shards and manifest, determinism, resume after kill -9, verify, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptforge import cli
from gptforge.data import prepare as prep
from gptforge.data import shards, sources
from gptforge.data.loader import ShardLoader
from gptforge.errors import GPTForgeError
from gptforge.tokenizer import EOT_ID, get_encoding

SHARD = 3000


def make_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> list[str]:
    """Text files and a jsonl of varied documents (specials as text, unicode); returns them in order."""
    rng = random.Random(seed)
    words = ["the", "model", "token", "<|endoftext|>", "naïve", "données", "数据", "🙂", "\n", "  ", "def f(x):", "42"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 200))) for _ in range(n_docs)]
    (root / "txt").mkdir(parents=True)
    half = n_docs // 2
    for i, d in enumerate(docs[:half]):
        (root / "txt" / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    with open(root / "z.jsonl", "w", encoding="utf-8") as f:
        for d in docs[half:]:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def all_tokens(out: Path, manifest: dict, split: str) -> np.ndarray:
    parts = [np.load(out / s["file"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, np.uint16)


def tree_digest(out: Path) -> dict[str, str]:
    """sha256 of every visible file (the result): shards and manifest."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "corpus"
    return root, make_corpus(root)


def test_round_trip_equals_direct_tiktoken_encoding(corpus, tmp_path):
    root, docs = corpus
    m = prep.prepare([str(root)], tmp_path / "out", shard_tokens=SHARD, val_tokens=500, workers=1, progress=False)
    stream = np.concatenate([all_tokens(tmp_path / "out", m, "val"), all_tokens(tmp_path / "out", m, "train")])
    enc = get_encoding()
    expected = np.concatenate([np.array([EOT_ID] + enc.encode_ordinary(d), dtype=np.uint16) for d in docs])
    assert stream.dtype == np.uint16 and np.array_equal(stream, expected)
    assert enc.decode(stream.tolist()) == "".join("<|endoftext|>" + d for d in docs)
    # "<|endoftext|>" written in a document is text, never the EOT token: EOTs are exactly the doc starts
    assert int(np.count_nonzero(stream == EOT_ID)) == len(docs)


def test_shard_sizes_manifest_and_validation_rule(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "out"
    m = prep.prepare([str(root)], out, shard_tokens=SHARD, val_tokens=700, workers=1, progress=False)
    enc = get_encoding()
    lengths = [1 + len(enc.encode_ordinary(d)) for d in docs]
    # val = the fewest leading whole documents with >= 700 tokens
    k = next(i + 1 for i in range(len(docs)) if sum(lengths[: i + 1]) >= 700)
    assert m["splits"]["val"]["num_tokens"] == sum(lengths[:k]) and m["splits"]["val"]["num_documents"] == k
    assert m["splits"]["train"]["num_tokens"] == sum(lengths[k:]) and m["splits"]["train"]["num_documents"] == len(docs) - k
    assert m["tokenizer"] == "gpt2" and m["vocab_size"] == 50257 and m["eot_id"] == EOT_ID and m["dtype"] == "uint16"
    assert m["documents"]["documents"] == len(docs) and m["documents"]["files_read"] == 31
    assert m["options"]["shard_tokens"] == SHARD and m["sources"] == [os.path.relpath(root.resolve(), out.resolve())]  # portable
    for split in ("val", "train"):
        entries = m["splits"][split]["shards"]
        assert [e["file"] for e in entries] == [f"{split}_{i:06d}.npy" for i in range(len(entries))]
        assert all(e["num_tokens"] == SHARD for e in entries[:-1]) and 0 < entries[-1]["num_tokens"] <= SHARD
        for e in entries:
            arr = np.load(out / e["file"], mmap_mode="r")
            assert arr.dtype == np.uint16 and arr.shape == (e["num_tokens"],)
            assert hashlib.sha256((out / e["file"]).read_bytes()).hexdigest() == e["sha256"]
            assert e["num_documents"] == int(np.count_nonzero(arr == EOT_ID))
    assert len(m["splits"]["train"]["shards"]) >= 3
    assert json.loads((out / "manifest.json").read_text()) == m
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]  # no leftovers


def test_encode_documents_is_eot_plus_encode_ordinary():
    enc = get_encoding()
    texts = ["plain", "<|endoftext|> is text here", "lone surrogate \ud800 from JSON", "漢字 🙂"]
    got = prep.encode_documents(texts)
    want = np.concatenate([np.array([EOT_ID] + enc.encode_ordinary(t)) for t in texts]).astype(np.uint16)
    assert got.dtype == np.uint16 and np.array_equal(got, want)


def test_concurrent_runs_into_one_directory_wait_for_each_other(corpus, tmp_path):
    import threading

    root, _ = corpus
    results: list = []

    def run():
        results.append(prep.prepare([str(root)], tmp_path / "out", shard_tokens=SHARD, workers=1, progress=False))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and results[0] == results[1] == results[2]
    shards.verify(tmp_path / "out")


def test_default_validation_rule():
    assert prep.default_val_tokens(1000) == 100  # a tiny corpus: 10%
    assert prep.default_val_tokens(1001) == 101  # ceil(10%)
    assert prep.default_val_tokens(300_000) == 30_000  # 10% of a small corpus: 7 batches of 16 x 256
    assert prep.default_val_tokens(500_000) == 32_769  # one default evaluation pass (the 0.5M corpus got 2,924)
    assert prep.default_val_tokens(15_300_000) == 76_500  # a large corpus: 0.5%, as before
    assert prep.default_val_tokens(10**12) == 10_000_000  # capped


def test_default_val_takes_first_documents_and_never_all(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("only one document here")
    m = prep.prepare([str(tmp_path / "in")], tmp_path / "o1", workers=1, progress=False)
    assert m["splits"]["val"]["num_tokens"] == 0 and m["splits"]["train"]["num_documents"] == 1
    (tmp_path / "in" / "b.txt").write_text("a second one")
    m = prep.prepare([str(tmp_path / "in")], tmp_path / "o2", workers=1, progress=False)
    assert m["splits"]["val"]["num_documents"] == 1 and m["splits"]["train"]["num_documents"] == 1
    with pytest.raises(GPTForgeError, match=r"--val-tokens 10000 would put all 2 documents \(\d+ tokens\) in the validation split"):
        prep.prepare([str(tmp_path / "in")], tmp_path / "o3", val_tokens=10_000, workers=1, progress=False)
    assert not (tmp_path / "o3" / "manifest.json").exists() and not (tmp_path / "o3" / prep.PARTS).exists()


def test_default_val_cuts_inside_one_long_document(tmp_path):
    """tinyshakespeare's shape: one input.txt. Whole documents would leave val empty; the default
    split cuts the document at the target instead, and the manifest's counts still add up."""
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "input.txt").write_text(text * 3)  # one document, ~13k tokens
    m = prep.prepare([str(tmp_path / "in")], tmp_path / "o", workers=1, progress=False)
    total = m["splits"]["val"]["num_tokens"] + m["splits"]["train"]["num_tokens"]
    assert total > 10 * prep.VAL_CUT_MIN
    assert m["splits"]["val"]["num_tokens"] == prep.default_val_tokens(total)  # 10%, cut mid-document
    assert m["splits"]["val"]["num_documents"] == 1 and m["splits"]["train"]["num_documents"] == 0
    shards.verify(tmp_path / "o")  # sha256, token and document counts agree with the manifest


def test_workers_do_not_change_the_bytes_and_rerun_finds_work_done(corpus, tmp_path):
    root, _ = corpus
    a = prep.prepare([str(root)], tmp_path / "a", shard_tokens=SHARD, workers=1, progress=False)
    b = prep.prepare([str(root)], tmp_path / "b", shard_tokens=SHARD, workers=2, progress=False)
    assert a == b and tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    assert prep.prepare([str(root)], tmp_path / "a", shard_tokens=SHARD, workers=2, progress=False) == a
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == mtimes  # nothing rewritten


def test_other_options_are_an_error_unless_overwrite(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    prep.prepare([str(root)], out, shard_tokens=SHARD, workers=1, progress=False)
    with pytest.raises(prep.OptionsMismatch, match=r"already holds shards prepared with other options \(shard_tokens 3000 -> 4000\); pass --overwrite"):
        prep.prepare([str(root)], out, shard_tokens=4000, workers=1, progress=False)
    (root / "txt" / "doc000.txt").write_text("changed")
    with pytest.raises(prep.OptionsMismatch, match="the input files changed"):
        prep.prepare([str(root)], out, shard_tokens=SHARD, workers=1, progress=False)
    m = prep.prepare([str(root)], out, shard_tokens=4000, workers=1, progress=False, overwrite=True)
    assert m["options"]["shard_tokens"] == 4000
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(e["file"] for s in m["splits"].values() for e in s["shards"])


def test_an_unfinished_run_with_other_options_is_an_error(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / "out"

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "cut", crash)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([str(root)], out, shard_tokens=SHARD, workers=1, progress=False)
    monkeypatch.undo()
    with pytest.raises(prep.OptionsMismatch, match=r"unfinished preparation with other options \(val_tokens 'auto' -> 100\)"):
        prep.prepare([str(root)], out, shard_tokens=SHARD, val_tokens=100, workers=1, progress=False)
    prep.prepare([str(root)], out, shard_tokens=SHARD, workers=1, progress=False)  # the same command finishes it
    assert (out / "manifest.json").exists() and not (out / prep.PARTS).exists()


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gptforge", "prepare", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, **kw,
    )


def assert_no_truncated_final_files(out: Path) -> None:
    """Whatever carries a final name (shards, parts, json) is complete."""
    for p in list(out.glob("*.npy")) + list((out / prep.PARTS).glob("*.npy")):
        arr = np.load(p, mmap_mode="r")  # raises on a truncated .npy
        assert p.stat().st_size == arr.offset + arr.nbytes, p
    for p in [out / "manifest.json", out / prep.STATE, out / prep.PARTS / prep.LAYOUT]:
        if p.exists():
            json.loads(p.read_text())


def progress_of(out: Path) -> tuple[int, int]:
    """(parts, shards) under their final names: how far a run is in each stage."""
    return len(list((out / prep.PARTS).glob("part_*.npy"))), len(list(out.glob("*.npy")))


def test_kill_9_at_random_moments_then_rerun_is_byte_identical(tmp_path):
    root = tmp_path / "corpus"
    make_corpus(root, n_docs=600, seed=1)
    args = [str(root), "--shard-tokens", "3000", "--val-tokens", "2000", "--quiet"]
    ref = prep.prepare([str(root)], tmp_path / "ref", shard_tokens=3000, val_tokens=2000, workers=1, progress=False)
    expected = tree_digest(tmp_path / "ref")
    n_shards = len(expected) - 1
    n_parts = ref["splits"]["train"]["num_tokens"] // 3000  # parts are cut at the first document >= 3000 tokens
    assert n_shards > 50 and n_parts > 40  # many files: many moments to be killed in

    # kill -9 (the command and its workers) at random points: during tokenizing (after some parts),
    # twice while cutting shards, and once at a random time after start (possibly during start-up)
    rng = random.Random(1234)
    k2 = rng.randint(1, n_shards // 2)
    targets = [(0, rng.randint(1, n_parts - 5)), (1, k2), (1, rng.randint(k2 + 1, n_shards - 5)), (None, rng.uniform(0, 1.5))]
    out = tmp_path / "out"
    kills = []
    for stage, target in targets:
        p = run_cli([*args, "--out", str(out), "--workers", "2"])
        if stage is None:
            time.sleep(target)
        else:
            while p.poll() is None and progress_of(out)[stage] < target:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.003))  # anywhere within the writing of the next file
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills.append(progress_of(out))
        p.wait(timeout=60)
        assert not (out / "manifest.json").exists() or stage is None
        assert_no_truncated_final_files(out)
    assert len(kills) >= 3, kills
    p = run_cli([*args, "--out", str(out), "--workers", "2"])
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert tree_digest(out) == expected
    assert not (out / prep.PARTS).exists() and not (out / prep.STATE).exists()


def test_resume_after_interruption_in_each_stage(corpus, tmp_path, monkeypatch):
    """Deterministic companions of the kill test: stop after some parts / some shards, re-run."""
    root, _ = corpus
    ref = prep.prepare([str(root)], tmp_path / "ref", shard_tokens=500, workers=1, progress=False)
    for stage, target, after in (("parts", prep.shards, 3), ("shards", prep.shards, 8)):
        out = tmp_path / stage
        real = shards.write_shard
        count = {"n": 0}

        def flaky(path, *a, **k):
            if (Path(path).name.startswith("part_")) == (stage == "parts"):
                count["n"] += 1
                if count["n"] > after:
                    raise KeyboardInterrupt  # as if killed between two files
            return real(path, *a, **k)

        monkeypatch.setattr(target, "write_shard", flaky)
        with pytest.raises(KeyboardInterrupt):
            prep.prepare([str(root)], out, shard_tokens=500, workers=1, progress=False)
        monkeypatch.setattr(target, "write_shard", real)
        written = sorted(p.name for p in (out / prep.PARTS).glob("part_*.npy")) if stage == "parts" else sorted(p.name for p in out.glob("*.npy"))
        assert len(written) == after
        assert prep.prepare([str(root)], out, shard_tokens=500, workers=1, progress=False) == ref
        assert tree_digest(out) == tree_digest(tmp_path / "ref")


# --------------------------------------------------------------------------- verify and bad shards


@pytest.fixture
def prepared(corpus, tmp_path) -> Path:
    root, _ = corpus
    out = tmp_path / "prepared"
    prep.prepare([str(root)], out, shard_tokens=SHARD, val_tokens=500, workers=1, progress=False)
    return out


def cli_error(capsys, argv: list[str]) -> str:
    """The command fails with exit status 1 and one error line (after any warnings)."""
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("gptforge prepare: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert all(line.startswith("gptforge: warning: ") for line in lines[:-1]), lines
    return errors[0]


def test_verify_passes_on_a_good_directory(prepared, capsys):
    assert cli.main(["prepare", "--verify", str(prepared)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_catches_a_changed_byte(prepared, capsys):
    shard = prepared / "train_000001.npy"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1  # same size, same header: only the checksum can tell
    shard.write_bytes(bytes(data))
    ShardLoader(prepared, batch_size=1, seq_len=8)  # the cheap checks on open do not read everything
    err = cli_error(capsys, ["prepare", "--verify", str(prepared)])
    assert f"{shard}: sha256" in err and "disagrees with manifest.json" in err


def test_truncated_shard_is_caught_on_open(prepared, capsys):
    shard = prepared / "train_000000.npy"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(GPTForgeError, match=rf"{shard}: truncated: \d+ bytes, expected \d+ \(3000 tokens of uint16\)"):
        ShardLoader(prepared, batch_size=1, seq_len=8)
    assert "truncated" in cli_error(capsys, ["prepare", "--verify", str(prepared)])


def test_wrong_dtype_and_shape_are_caught_on_open(prepared):
    shard = prepared / "train_000000.npy"
    tokens = np.load(shard)
    np.save(shard, tokens.astype(np.uint32))
    with pytest.raises(GPTForgeError, match=rf"{shard}: dtype uint32, but manifest.json says uint16"):
        ShardLoader(prepared, batch_size=1, seq_len=8)
    np.save(shard, tokens[:-1])
    with pytest.raises(GPTForgeError, match=rf"{shard}: holds 2999 tokens, but manifest.json says 3000"):
        ShardLoader(prepared, batch_size=1, seq_len=8)
    np.save(shard, tokens.reshape(2, -1))
    with pytest.raises(GPTForgeError, match=rf"{shard}: shape \(2, 1500\), expected a 1-D array of 3000 tokens"):
        ShardLoader(prepared, batch_size=1, seq_len=8)
    shard.write_bytes(b"garbage, not npy")
    with pytest.raises(GPTForgeError, match=rf"{shard}: not a valid .npy shard"):
        ShardLoader(prepared, batch_size=1, seq_len=8)
    shard.unlink()
    with pytest.raises(GPTForgeError, match=rf"{shard}: shard listed in manifest.json is missing"):
        ShardLoader(prepared, batch_size=1, seq_len=8)


def test_token_ids_beyond_the_vocabulary(prepared, capsys):
    shard = prepared / "val_000000.npy"
    tokens = np.load(shard)
    tokens[5] = 60000
    np.save(shard, tokens)  # same size and header: the checks on open pass
    m = json.loads((prepared / "manifest.json").read_text())
    m["splits"]["val"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (prepared / "manifest.json").write_text(json.dumps(m))
    err = cli_error(capsys, ["prepare", "--verify", str(prepared)])
    assert f"{shard}: token id 60000 at position 5 is >= the vocabulary size 50257" in err
    loader = ShardLoader(prepared, split="val", batch_size=1, seq_len=8)
    with pytest.raises(GPTForgeError, match=rf"{shard}: token id 60000 at position 5 is >= the vocabulary size 50257"):
        loader.next_batch()


def test_missing_and_foreign_manifests(tmp_path, capsys):
    err = cli_error(capsys, ["prepare", "--verify", str(tmp_path)])
    assert f"{tmp_path / 'manifest.json'}: not found" in err
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(GPTForgeError, match="not a gptforge shard manifest"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(GPTForgeError, match="unreadable or not JSON"):
        shards.read_manifest(tmp_path)


# --------------------------------------------------------------------------- command-line errors


def test_cli_bad_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_text("")
    (tmp_path / "in" / "bad.txt").write_bytes(b"\xff\xfe")
    out = str(tmp_path / "out")
    err = cli_error(capsys, ["prepare", str(tmp_path / "in"), "--out", out, "--workers", "1", "--quiet"])
    assert "no documents found in" in err and "(1 files read, 1 files skipped, 1 empty documents)" in err
    assert not (tmp_path / "out" / prep.STATE).exists() and not list((tmp_path / "out").glob("*.npy"))
    err = cli_error(capsys, ["prepare", str(tmp_path / "in"), "--out", out, "--strict", "--quiet"])
    assert "bad.txt: not valid UTF-8 (byte 0xff at offset 0)" in err
    (tmp_path / "x.jsonl").write_text('{"body": "a"}\n')
    err = cli_error(capsys, ["prepare", str(tmp_path / "x.jsonl"), "--out", out, "--quiet"])
    assert "x.jsonl line 1: no field 'text' (fields: body); choose one with --text-field" in err
    assert "nope: no such file or directory" in cli_error(capsys, ["prepare", str(tmp_path / "nope"), "--out", out])
    assert "no SOURCE given" in cli_error(capsys, ["prepare", "--out", out])
    assert "--out DIR is required" in cli_error(capsys, ["prepare", str(tmp_path / "x.jsonl")])
    assert "--shard-tokens must be a positive integer, got 0" in cli_error(capsys, ["prepare", str(tmp_path / "x.jsonl"), "--out", out, "--shard-tokens", "0"])
    assert "--val-tokens must be an integer >= 0, got -1" in cli_error(capsys, ["prepare", str(tmp_path / "x.jsonl"), "--out", out, "--val-tokens", "-1"])
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "train_000000.npy").write_bytes(b"x")
    (tmp_path / "ok.txt").write_text("fine text")
    err = cli_error(capsys, ["prepare", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "foreign"), "--quiet"])
    assert "holds shard files but no manifest.json; pass --overwrite" in err


def test_cli_prepares_and_summarizes(corpus, tmp_path, capsys):
    root, docs = corpus
    assert cli.main(["prepare", str(root), "--out", str(tmp_path / "o"), "--shard-tokens", "3_000", "--val-tokens", "500", "--workers", "1", "--quiet"]) == 0
    m = shards.read_manifest(tmp_path / "o")
    assert m["options"]["shard_tokens"] == 3000 and m["options"]["val_tokens"] == 500
    v, t = m["splits"]["val"], m["splits"]["train"]
    assert capsys.readouterr().out.startswith(
        f"{tmp_path / 'o'}: val: {v['num_tokens']:,} tokens, {v['num_documents']:,} documents, 1 shards; "
        f"train: {t['num_tokens']:,} tokens, {t['num_documents']:,} documents, {len(t['shards'])} shards ("
    )
    assert v["num_documents"] + t["num_documents"] == len(docs)


# --------------------------------------------------------------------------- default corpus


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "c1"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prep.default_cache_dir() == tmp_path / "c1"
    monkeypatch.delenv("GPTFORGE_CACHE")
    assert prep.default_cache_dir() == tmp_path / "xdg" / "gptforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert prep.default_cache_dir() == tmp_path / "home" / ".cache" / "gptforge"


def test_ensure_default_corpus_prepares_once_and_redoes_for_another_python(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    files = sources.stdlib_files()
    few = [f for f in files if f.name in ("bisect.py", "heapq.py", "textwrap.py", "glob.py")]
    monkeypatch.setattr(sources, "stdlib_files", lambda: few)
    d = prep.ensure_default_corpus(workers=1, progress=False)
    assert d == tmp_path / "cache" / "data" / "python-stdlib"
    m = shards.read_manifest(d)
    assert m["sources"] == ["python-stdlib"] and m["documents"]["documents"] == 4
    assert m["splits"]["val"]["num_documents"] == 2  # 10% of a small corpus (~2.3k tokens), rounded up to whole documents
    before = tree_digest(d)
    assert prep.ensure_default_corpus(workers=1, progress=False) == d and tree_digest(d) == before
    monkeypatch.setattr(sources, "stdlib_files", lambda: few[:3])  # another interpreter's stdlib
    prep.ensure_default_corpus(workers=1, progress=False)
    assert shards.read_manifest(d)["documents"]["documents"] == 3
