"""Inputs are what they claim (issue 26, the data side): only regular files are read as sources,
documents in bounded pieces; a tokenizer is its content; SHA256SUMS stays inside its directory;
skipped files are warned about once each; finished data is recognised without writing.

Commands whose failure on older code could hang or eat memory (a FIFO, /dev/zero) run as
subprocesses with a timeout and an address-space limit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptforge import tokenizer as tk
from gptforge.data import prepare as prep
from gptforge.data import shards
from gptforge.errors import GPTForgeError

from .conftest import assert_one_line_error, cli_env

MEMORY_LIMIT = 3 << 30  # bytes of address space a prepare subprocess may take


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_limited(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m gptforge ARGS` with a timeout and an address-space limit (a FIFO would hang
    the code that reads it, /dev/zero would grow it without bound)."""
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), preexec_fn=_limited)


def _text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "naïve", "données", "def", "f(x):", "42", "数据", "return", "🙂", "tokens"]
    return " ".join(words[i] for i in rng.integers(0, len(words), n_words))


# --------------------------------------------------------------------------- item 6: regular files only


def test_fifo_device_socket_and_symlink_loop_in_a_source_dir_are_named_and_skipped(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    (src / "a.txt").write_text(_text(300))
    os.mkfifo(src / "p.txt")
    (src / "z.txt").symlink_to("/dev/zero")
    (src / "loop.txt").symlink_to(src / "loop.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "u.txt"))
    try:
        proc = run_limited("prepare", str(src), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet")
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning: skipping" in line]
    for name, kind in (("p.txt", "FIFO"), ("z.txt", "device"), ("loop.txt", "symlink loop"), ("u.txt", "socket")):
        hits = [w for w in warnings if f"/{name}:" in w]
        assert len(hits) == 1 and kind in hits[0], (name, warnings)
    manifest = json.loads((tmp_path / "out" / shards.MANIFEST).read_text())
    assert manifest["documents"]["files_skipped"] == 4 and manifest["documents"]["files_read"] == 1
    assert "4 files skipped" in proc.stdout
    leftovers = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("."))
    assert leftovers == [".lock"]  # no half-done state


@pytest.mark.parametrize("kind", ["fifo", "loop", "dev-zero"])
def test_a_non_regular_file_named_as_the_source_is_one_line(tmp_path, kind):
    path = tmp_path / "x.txt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "loop":
        path.symlink_to(path)
    else:
        path.symlink_to("/dev/zero")
    proc = run_limited("prepare", str(path), "--out", str(tmp_path / "out"), "--workers", "1", "--quiet")
    assert_one_line_error(proc, "prepare", "x.txt", "regular file" if kind != "loop" else "symlink loop")
    assert not (tmp_path / "out" / prep.STATE).exists() and not (tmp_path / "out" / prep.PARTS).exists()


def test_a_single_line_document_is_read_in_bounded_pieces(tmp_path):
    """Peak memory does not grow with the length of a line. Reading a document whole takes about 8x
    its size (bytes, a 4-byte-per-character str, tokens: 178 MiB for this 22.5 MiB line); in pieces
    the growth is about flat (38 MiB for 5.6 MiB, 46 MiB for 22.5 MiB: the interpreter's first use
    of the code paths, pieces, file pages of the parts)."""
    text = _text(4_000_000)  # 22.5 MB on one line
    src = tmp_path / "long.txt"
    src.write_text(text)
    size = src.stat().st_size
    code = f"""
from gptforge.data.prepare import prepare
from gptforge.tokenizer import Tokenizer

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

Tokenizer().encode("warm up")  # the encoding's tables belong to the baseline
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = kib("VmRSS")
prepare([{str(src)!r}], {str(tmp_path / 'out')!r}, workers=1, progress=False, shard_tokens=1 << 20)
print((kib("VmHWM") - base) * 1024)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=cli_env(),
                          preexec_fn=_limited)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1])
    print(f"peak RSS growth {growth / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB single-line document")
    assert growth < 3 * size, f"peak RSS grew by {growth / 2**20:.1f} MiB reading a {size / 2**20:.1f} MiB line"


def test_a_long_document_in_pieces_has_the_tokens_of_the_whole(tmp_path, monkeypatch):
    from gptforge.data import sources

    monkeypatch.setattr(sources, "PIECE_CHARS", 1000)
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 4000)
    text = _text(20_000, seed=1) + "\n" + "x" * 10_000  # a safe point every few characters, then none
    (tmp_path / "long.txt").write_text(text)
    pieces = list(sources.iter_pieces(sources.resolve_all([str(tmp_path / "long.txt")])))
    assert len(pieces) > 50 and max(len(p) for p, _ in pieces) <= 4000 and [f for _, f in pieces].count(True) == 1
    m = prep.prepare([str(tmp_path / "long.txt")], tmp_path / "out", workers=1, progress=False, val_tokens=0)
    stream = np.concatenate([np.load(tmp_path / "out" / s["file"]) for s in m["splits"]["train"]["shards"]])
    enc = tk.get_encoding()
    head = len(text) - 10_000
    want_head = [tk.EOT_ID] + enc.encode_ordinary(text[:head])
    assert stream[: len(want_head)].tolist() == want_head  # cut only at safe points: the same tokens
    assert tk.Tokenizer().decode(stream[1:]) == text  # the unsafe tail is cut, still every character


# --------------------------------------------------------------------------- item 8: a tokenizer is its content


def _small_tokenizer() -> tk.Tokenizer:
    merges = [b"th", b"he", b"the", b"in", b"an", b"er", b"on", b"re"]
    return tk.Tokenizer.from_ranks([bytes([b]) for b in range(256)] + merges, "gpt2")


def _swapped_file(tok: tk.Tokenizer) -> bytes:
    """The tokenizer's file with two ranks swapped, its name kept and content_sha256 recomputed."""
    body = json.loads(tok.file_bytes())
    ranks = [base64.b64decode(r) for r in body["ranks"]]
    ranks[256], ranks[257] = ranks[257], ranks[256]
    body["ranks"] = [base64.b64encode(r).decode("ascii") for r in ranks]
    body["content_sha256"] = tk._content_sha256(ranks, body["pattern"], body["special_tokens"])
    return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


def test_ranks_swapped_under_a_kept_name_are_refused_by_prepare_into_existing_data(tmp_path, corpus_dir):
    tok = _small_tokenizer()
    tok.save(tmp_path / "tok")
    out = tmp_path / "data"
    prep.prepare([str(corpus_dir)], out, tokenizer=str(tmp_path / "tok"), workers=1, progress=False)
    forged = tmp_path / "forged.json"
    forged.write_bytes(_swapped_file(tok))
    with pytest.raises(GPTForgeError, match=r"forged\.json.*name .* is not its content"):
        prep.prepare([str(corpus_dir)], out, tokenizer=str(forged), workers=1, progress=False)


def test_data_whose_manifest_names_a_forged_tokenizer_is_refused(tmp_path, corpus_dir):
    tok = _small_tokenizer()
    tok.save(tmp_path / "tok")
    out = tmp_path / "data"
    prep.prepare([str(corpus_dir)], out, tokenizer=str(tmp_path / "tok"), workers=1, progress=False)
    forged = _swapped_file(tok)
    (out / "tokenizer" / tk.TOKENIZER_FILE).write_bytes(forged)
    manifest = json.loads((out / shards.MANIFEST).read_text())
    manifest["tokenizer_sha256"] = hashlib.sha256(forged).hexdigest()  # the record follows the forgery
    (out / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(GPTForgeError, match="is not its content"):
        shards.data_tokenizer(out)
    with pytest.raises(GPTForgeError, match="is not its content"):
        tk.resolve(out)


# --------------------------------------------------------------------------- item 10: SHA256SUMS stays inside


@pytest.mark.parametrize("entry", ["../secret.txt", "/ABS/secret.txt", "sub/../../secret.txt"])
def test_sha256sums_entries_outside_the_directory_are_refused(tmp_path, entry):
    from gptforge import checkpoint

    secret = tmp_path / "secret.txt"
    secret.write_text("the user's file")
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    entry = entry.replace("/ABS", str(tmp_path))
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    (d / "SHA256SUMS").write_text(f"{hashlib.sha256(b'{}').hexdigest()}  config.json\n{digest}  {entry}\n")
    with pytest.raises(GPTForgeError, match=r"SHA256SUMS: line 2 names .*outside"):
        checkpoint.verify_dir(d)
    tok = _small_tokenizer()
    tok.save(tmp_path / "tok")
    with open(tmp_path / "tok" / "SHA256SUMS", "a") as f:
        f.write(f"{digest}  {entry}\n")
    with pytest.raises(GPTForgeError, match=r"SHA256SUMS: line \d+ names .*outside"):
        tk.Tokenizer.load(tmp_path / "tok")


# --------------------------------------------------------------------------- item 12: warnings once; read-only reruns


def test_non_utf8_files_are_warned_about_once_each_with_a_trained_tokenizer(tmp_path, corpus_dir, capsys):
    src = tmp_path / "src"
    shutil.copytree(corpus_dir, src)
    (src / "bad1.txt").write_bytes(b"caf\xe9 latin-1\n")
    (src / "bad2.txt").write_bytes(b"\xff\xfe not utf-8\n")
    capsys.readouterr()
    m = prep.prepare([str(src)], tmp_path / "out", tokenizer="train:300", workers=1, progress=True)
    err = capsys.readouterr().err
    for name in ("bad1.txt", "bad2.txt"):
        assert err.count(f"skipping {src / name}") == 1, err
    assert m["documents"]["files_skipped"] == 2


def test_the_embedded_corpus_says_how_many_files_it_skipped(tmp_path, monkeypatch, capsys):
    from gptforge.data import sources

    bad = tmp_path / "latin1.py"
    bad.write_bytes(b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n")
    few = sources.stdlib_files()[:5] + [bad]
    monkeypatch.setattr(sources, "stdlib_files", lambda: few)
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    prep.ensure_default_corpus(workers=1, progress=True)
    err = capsys.readouterr().err
    assert err.count(f"skipping {bad}") == 1
    summary = [line for line in err.splitlines() if "1 files skipped" in line]
    assert len(summary) == 1 and "python-stdlib" in summary[0], err
    assert err.index(f"skipping {bad}") < err.index(summary[0])


def test_a_no_op_rerun_on_read_only_finished_data_writes_nothing(tmp_path, corpus_dir):
    out = tmp_path / "out"
    first = prep.prepare([str(corpus_dir)], out, workers=1, progress=False)
    (out / prep.LOCK).unlink()
    modes = {p: p.stat().st_mode for p in [out, *out.rglob("*")]}
    try:
        for p in modes:
            p.chmod(stat.S_IMODE(modes[p]) & ~0o222)
        again = prep.prepare([str(corpus_dir)], out, workers=1, progress=False)
    finally:
        for p, mode in modes.items():
            p.chmod(stat.S_IMODE(mode))
    assert again == first
    assert not (out / prep.LOCK).exists()  # nothing written: no lock taken where nothing is to be done
