"""Trained byte-level BPE tokenizers: training, files, prepare, the model's vocabulary, every path
that encodes (prepare, sample's prompt, eval, HF export), bits per byte, and the errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge import cli
from gptforge import tokenizer as tk
from gptforge.data import shards
from gptforge.data.prepare import prepare
from gptforge.data.tokenizer_sample import sample_documents, train_tokenizer
from gptforge.data import sources as S
from gptforge.errors import GPTForgeError

HOSTILE = [
    "",
    "emoji 🦙🔥 and a family 👩‍👩‍👧 and flags 🇯🇵🇫🇷",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "e\u0301 a\u0308\u0304 combining marks z\u0336\u0335\u0334",
    "control \x00\x01\x02\x07\x08\x0b\x0c\x1b\x1c\x1d\x1e\x1f\x7f\x85\u2028\u2029 chars\r\n\r\n",
    "a" * 20_000,
    " " * 10_000 + "x",
    "\n" * 5_000,
    "\t\t\t\tdef f():\n\t\t\t\t\treturn 1",
    "digits 1234567890 ١٢٣٤٥ 𝟙𝟚𝟛 ½",
    "\ufeffbyte order mark, zero\u200bwidth, rtl \u202eevil\u202c",
    "\U0010ffff\U000e0001 the last planes",
    "<|endoftext|> as plain text",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe512"
    train_tokenizer([str(corpus_dir)], out, 512, progress=False)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> tk.Tokenizer:
    return tk.Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus_dir, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("bpe-data")
    prepare([str(corpus_dir)], out, shard_tokens=8192, val_tokens=4096, workers=1, progress=False, tokenizer=str(tok_dir))
    return out


def corpus_docs(corpus_dir) -> list[str]:
    return list(S.iter_documents(S.resolve_all([str(corpus_dir)])))


# ------------------------------------------------------------------------------ the tokenizer


def test_trained_tokenizer_files_and_ids(tok_dir, tok):
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == ["SHA256SUMS", "gptforge-tokenizer.json", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert tok.vocab_size == 512 and tok.eot_id == 511 and tok.trained
    assert tok.name.startswith("bpe512-") and tok.pattern_name == tk.DEFAULT_PATTERN
    assert [tok.decode_bytes([i]) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert tok.encode("<|endoftext|>", allow_eot=True) == [511]
    assert 511 not in tok.encode("<|endoftext|>")  # plain text by default
    tb = tok.token_bytes()
    assert tb[511] == 0 and tb[:256].tolist() == [1] * 256
    assert all(tb[i] == len(tok.decode_bytes([i])) for i in range(256, 511))
    meta = json.loads((tok_dir / tk.TOKENIZER_FILE).read_text())
    assert meta["pattern"] == tk.PATTERNS[tk.DEFAULT_PATTERN] and meta["trained"]["chars"] > 0


@pytest.mark.parametrize("text", HOSTILE)
def test_round_trip_on_hostile_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < tok.eot_id for i in ids)


def test_compresses_its_own_corpus_better_than_gpt2(tmp_path, corpus_dir):
    docs = corpus_docs(corpus_dir)
    out = train_tokenizer([str(corpus_dir)], tmp_path / "t", 2048, progress=False)
    n_bytes = sum(len(d.encode()) for d in docs)
    trained = sum(len(out.encode(d)) for d in docs)
    gpt2 = sum(len(tk.Tokenizer().encode(d)) for d in docs)
    assert n_bytes / trained > 1.3 * (n_bytes / gpt2)  # Python source: indentation and names in few tokens


def test_training_is_deterministic(tmp_path, corpus_dir, tok):
    again = train_tokenizer([str(corpus_dir)], tmp_path / "again", 512, progress=False)
    assert again.name == tok.name and again.ranks() == tok.ranks()


def test_every_pattern_trains_and_round_trips(tmp_path, corpus_dir):
    for name in tk.PATTERNS:
        t = train_tokenizer([str(corpus_dir)], tmp_path / name, 300, pattern=name, progress=False)
        assert t.pattern_name == name and t.decode(t.encode(HOSTILE[4])) == HOSTILE[4]


def test_sample_is_spread_over_the_corpus(tmp_path, corpus_dir):
    lines = [json.dumps({"text": f"document {i:04d} " + "x" * 90}) for i in range(300)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    srcs = S.resolve_all([str(tmp_path / "docs.jsonl")])
    total = sum(len(json.loads(line)["text"]) for line in lines)
    info: dict = {}
    taken = list(sample_documents(srcs, total // 3, progress=False, info=info))
    assert info["chars"] == sum(map(len, taken)) <= total // 3 and info["documents_read"] >= 295
    ids = [int(t.split()[1]) for t in taken]
    assert len(ids) >= 80 and ids[0] < 5 and ids[-1] > 285  # over the whole corpus (the estimate counts JSON too)
    assert max(b - a for a, b in zip(ids, ids[1:])) <= 5  # about every third document
    docs = corpus_docs(corpus_dir)
    srcs = S.resolve_all([str(corpus_dir)])
    assert "".join(sample_documents(srcs, 10**12, progress=False)) == "".join(docs)  # small corpus: all of it
    assert sum(map(len, sample_documents(srcs, 100, progress=False))) == 100  # a document cut at the budget


# ------------------------------------------------------------------------------ HF export


def test_autotokenizer_gives_the_same_ids(tok_dir, tok, corpus_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for doc in corpus_docs(corpus_dir) + HOSTILE[:-1]:  # the last: transformers takes <|endoftext|> as special
        assert hf.encode(doc, add_special_tokens=False) == tok.encode(doc)
    assert hf.decode(tok.encode(HOSTILE[2])) == HOSTILE[2]
    assert hf.convert_tokens_to_ids("<|endoftext|>") == tok.eot_id


# ------------------------------------------------------------------------------ prepare


def test_prepare_stores_the_tokenizer_with_the_data(data_dir, tok, corpus_dir):
    m = shards.read_manifest(data_dir)
    assert m["tokenizer"] == tok.name and m["vocab_size"] == 512 and m["eot_id"] == 511 and m["dtype"] == "uint16"
    assert m["tokenizer_file"] == "tokenizer/gptforge-tokenizer.json"
    assert m["tokenizer_sha256"] == tk.sha256_bytes((data_dir / m["tokenizer_file"]).read_bytes())
    assert shards.data_tokenizer(data_dir).name == tok.name
    # the shards are [EOT] + encode(doc) per document, exactly
    stream = np.concatenate([np.load(data_dir / e["file"]) for split in ("val", "train")
                             for e in m["splits"][split]["shards"]])
    want = np.concatenate([np.array([tok.eot_id] + tok.encode(d)) for d in corpus_docs(corpus_dir)])
    assert np.array_equal(stream, want)
    shards.verify(data_dir)


def test_prepare_train_n_trains_then_reruns_as_a_no_op(tmp_path, corpus_dir, capsys):
    out = tmp_path / "d"
    assert cli.main(["prepare", str(corpus_dir), "--tokenizer", "train:400", "--out", str(out), "--quiet",
                     "--val-tokens", "2000"]) == 0
    m = shards.read_manifest(out)
    assert m["tokenizer"].startswith("bpe400-") and m["options"]["tokenizer"] == "train:400"
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert cli.main(["prepare", str(corpus_dir), "--tokenizer", "train:400", "--out", str(out), "--quiet",
                     "--val-tokens", "2000"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # the data directory's tokenizer can be reused for other data
    other = tmp_path / "other"
    prepare([str(corpus_dir)], other, val_tokens=2000, workers=2, progress=False, tokenizer=str(out))
    assert shards.read_manifest(other)["tokenizer"] == m["tokenizer"]
    assert np.array_equal(np.load(other / "train_000000.npy"), np.load(out / "train_000000.npy"))  # 2 workers = 1


def test_prepare_with_another_tokenizer_into_the_same_dir_is_refused(data_dir, corpus_dir):
    with pytest.raises(GPTForgeError, match="tokenizer"):
        prepare([str(corpus_dir)], data_dir, shard_tokens=8192, val_tokens=4096, workers=1, progress=False)


def test_vocabulary_over_65536_writes_uint32_shards(tmp_path):
    # a synthetic tokenizer: the 256 bytes, then every pair of two bytes but the 256 doubled ones
    pairs = [bytes([a, b]) for a in range(256) for b in range(256) if a != b]
    pairs.sort(key=lambda t: not (t.isalpha() and t.islower()))  # lower-case pairs first: ids 256 ...
    pairs = pairs[::-1]  # ... or rather last: ids above 65,535
    big = tk.Tokenizer.from_ranks([bytes([b]) for b in range(256)] + pairs, "gpt2")
    assert big.vocab_size == 256 + 255 * 256 + 1 > 65_536
    big.save(tmp_path / "big")
    (tmp_path / "text.txt").write_text("hello world, ab cd " * 50)
    prepare([str(tmp_path / "text.txt")], tmp_path / "d", val_tokens=0, workers=1, progress=False,
            tokenizer=str(tmp_path / "big"))
    m = shards.read_manifest(tmp_path / "d")
    assert m["dtype"] == "uint32" and m["vocab_size"] == big.vocab_size
    from gptforge.data.loader import ShardLoader

    with ShardLoader(tmp_path / "d", batch_size=2, seq_len=16, order="sequential", vocab_size=big.vocab_size) as ld:
        x, _ = ld.next_batch()
    ids = [big.eot_id] + big.encode("hello world, ab cd " * 50)
    assert x.flatten().tolist() == ids[:32] and max(ids) > 65_535
    assert big.decode(ids[1:]) == "hello world, ab cd " * 50


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("n", [0, 255, 256, 1 << 32 + 1])
def test_vocab_size_out_of_range_is_one_line(tmp_path, corpus_dir, capsys, n):
    assert cli.main(["tokenizer", "train", str(corpus_dir), "--vocab-size", str(n), "--out", str(tmp_path / "t")]) == 1
    err = capsys.readouterr().err
    assert f"--vocab-size {n}: expected an integer from 257" in err and "4,294,967,296" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()
    with pytest.raises(GPTForgeError, match="vocabulary size"):
        prepare([str(corpus_dir)], tmp_path / "d", tokenizer=f"train:{n}", progress=False)


def test_empty_corpus_is_one_line_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert cli.main(["tokenizer", "train", str(tmp_path), "--vocab-size", "300", "--out", str(tmp_path / "t"),
                     "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: no documents found in" in err and "1 files skipped" in err and "nothing to train a tokenizer on" in err
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(GPTForgeError, match="no documents found"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "d", tokenizer="train:300", progress=False)
    assert not (tmp_path / "d" / "tokenizer").exists() and not (tmp_path / "d" / "manifest.json").exists()


def test_not_utf8_follows_prepares_policy(tmp_path, corpus_dir, capsys):
    src = tmp_path / "src"
    shutil.copytree(corpus_dir, src)
    (src / "zz_latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    t = train_tokenizer([str(src)], tmp_path / "t", 300, progress=False)  # skipped, with a warning
    assert "skipping" in capsys.readouterr().err and t.meta["trained"]["files_skipped"] == 1
    with pytest.raises(GPTForgeError, match=r"zz_latin1.txt: not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        train_tokenizer([str(src)], tmp_path / "t2", 300, strict=True, progress=False)
    assert not (tmp_path / "t2").exists()


def test_more_ids_than_the_text_holds_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("abc abc abd")
    with pytest.raises(GPTForgeError, match=r"holds only \d+ distinct merges, enough for \d+ ids"):
        train_tokenizer([str(tmp_path / "a.txt")], tmp_path / "t", 1000, progress=False)
    assert not (tmp_path / "t").exists()


def test_damaged_or_foreign_tokenizer_files(tmp_path, tok_dir, data_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tok_dir, bad)
    path = bad / tk.TOKENIZER_FILE
    body = json.loads(path.read_text())
    body["ranks"][300], body["ranks"][301] = body["ranks"][301], body["ranks"][300]  # two merges swapped
    path.write_text(json.dumps(body))
    with pytest.raises(GPTForgeError, match=r"gptforge-tokenizer.json: sha256 is [0-9a-f]{64}, but .*SHA256SUMS says"):
        tk.Tokenizer.load(bad)
    with pytest.raises(GPTForgeError, match="does not hash to content_sha256"):
        tk.Tokenizer.load(path)  # the file alone: its own content hash
    # the data's copy, checked against the manifest
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "tokenizer" / tk.TOKENIZER_FILE).write_text(path.read_text())
    with pytest.raises(GPTForgeError, match=r"manifest.json says [0-9a-f]{64}"):
        shards.data_tokenizer(data)
    with pytest.raises(GPTForgeError, match=r"verification failed: .*gptforge-tokenizer.json: sha256 is"):
        shards.verify(data)  # gptforge prepare --verify
    # not a tokenizer at all
    (tmp_path / "hf.json").write_text((tok_dir / "tokenizer.json").read_text())
    with pytest.raises(GPTForgeError, match="a Hugging Face tokenizer.json, not a gptforge tokenizer"):
        tk.Tokenizer.load(tmp_path / "hf.json")
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(GPTForgeError, match="not a gptforge tokenizer"):
        tk.Tokenizer.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(GPTForgeError, match="not a tokenizer"):
        tk.Tokenizer.load(tmp_path / "y.json")
    assert cli.main(["prepare", str(tok_dir), "--tokenizer", str(tmp_path / "x.json"), "--out", str(tmp_path / "o")]) == 1
    assert "not a gptforge tokenizer" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_tokenizer_dir_is_written_atomically(tmp_path, tok, monkeypatch):
    out = tmp_path / "t"
    real = Path.write_text

    def full_disk(self, *a, **k):
        if self.name == tk.SUMS:  # the last file, inside the temporary directory
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        tok.save(out)
    assert not out.exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(Path, "write_text", real)
    tok.save(out)
    (out / "marker").write_text("")  # an existing tokenizer is replaced whole, or kept on failure
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        tok.save(out, overwrite=True)
    assert (out / "marker").exists() and tk.Tokenizer.load(out).name == tok.name


# ------------------------------------------------------------------------------ training with it


def small_cfg(run_dir: Path, data_dir: Path, **overrides):
    from gptforge import config as C

    base = {
        "model.preset": "nano", "model.arch": "gpt2", "data.dir": str(data_dir), "data.seq_len": "32", "data.prefetch": "0",
        "optim.batch_tokens": "256", "optim.micro_batch_size": "4", "optim.lr": "3e-3", "optim.warmup_steps": "2",
        "run.dir": str(run_dir), "run.max_steps": "4", "run.device": "cpu", "run.precision": "fp32",
        "run.eval_every": "0", "run.eval_tokens": "1024", "run.ckpt_every": "2", "run.sample_tokens": "8",
        "run.peak_tflops": "1.0",
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return C.resolve(None, list(base.items()))


def train_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, data_dir):
    from gptforge.training.trainer import train

    run = tmp_path_factory.mktemp("bpe-run") / "run"
    res = train(small_cfg(run, data_dir), progress=False)
    return run, res


def test_the_model_vocabulary_and_every_checkpoint_come_from_the_tokenizer(bpe_run, tok):
    from gptforge.checkpoint import model_tokenizer, read_config, verify_dir

    run, res = bpe_run
    assert res.losses[0] == pytest.approx(math.log(512), abs=0.5)  # a 512-way softmax at init, not 50257
    for step in (2, 4):
        d = run / "checkpoints" / f"step_{step:06d}"
        meta = read_config(d)
        assert meta["model"]["vocab_size"] == 512 and meta["tokenizer"]["name"] == tok.name
        assert (d / tk.TOKENIZER_FILE).read_bytes() == tok.file_bytes() and tk.TOKENIZER_FILE in (d / "SHA256SUMS").read_text()
        verify_dir(d)
        assert model_tokenizer(d).name == tok.name
    saved = json.loads((run / "config.json").read_text())
    assert saved["resolved"]["tokenizer"]["name"] == tok.name
    vals = [r for r in train_rows(run) if "val_loss" in r]
    assert vals and all(0 < r["val_bpb"] < 20 for r in vals)
    import gptforge

    assert gptforge.load_tokenizer(run).name == tok.name and gptforge.load_tokenizer(run / "checkpoints" / "step_000002").name == tok.name


def test_resume_with_a_trained_tokenizer_is_bitwise(bpe_run, data_dir, tmp_path):
    from gptforge.training.trainer import train

    run, res = bpe_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    again = train(small_cfg(resumed, data_dir), resume="auto", progress=False)
    assert again.losses == {s: res.losses[s] for s in (2, 3)} and again.val_loss == res.val_loss


def test_a_checkpoint_paired_with_other_data_is_one_line(bpe_run, shards_dir, data_dir, tmp_path):
    from gptforge.training.trainer import train

    run, _ = bpe_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    with pytest.raises(GPTForgeError, match=r"tokenizer mismatch: checkpoint .* uses tokenizer bpe512-[0-9a-f]{12}, "
                                            r"but data .* was prepared with gpt2"):
        train(small_cfg(other, shards_dir), resume="auto", progress=False)
    # the data's tokenizer file damaged: training refuses it before the first step
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    f = damaged / "tokenizer" / tk.TOKENIZER_FILE
    f.write_bytes(f.read_bytes().replace(b'"vocab_size": 512', b'"vocab_size":  512'))
    with pytest.raises(GPTForgeError, match="sha256 is"):
        train(small_cfg(tmp_path / "r2", damaged), progress=False)
    assert not (tmp_path / "r2").exists()


def test_init_from_with_a_trained_tokenizer(bpe_run, data_dir, shards_dir, tmp_path):
    from gptforge.training.trainer import train

    run, _ = bpe_run
    res = train(small_cfg(tmp_path / "ft", data_dir, **{"model.init_from": str(run), "run.max_steps": 2}), progress=False)
    assert res.step == 2
    rec = json.loads((tmp_path / "ft" / "config.json").read_text())["resolved"]
    assert rec["weights"]["from"] == "init_from" and rec["tokenizer"]["name"].startswith("bpe512-")
    with pytest.raises(GPTForgeError, match=r"tokenizer mismatch: model.init_from .* uses tokenizer bpe512-.*"
                                            r"prepared with gpt2"):
        train(small_cfg(tmp_path / "ft2", shards_dir, **{"model.init_from": str(run)}), progress=False)
    from gptforge.checkpoint import save_model
    from gptforge.model import GPT, preset

    save_model(GPT(preset("nano")), tmp_path / "gpt2-nano", tokenizer=tk.Tokenizer())  # like `init_from gpt2`
    with pytest.raises(GPTForgeError, match=r"model.init_from .*gpt2-nano uses tokenizer gpt2, but data .* was "
                                            r"prepared with bpe512-"):
        train(small_cfg(tmp_path / "ft3", data_dir, **{"model.init_from": str(tmp_path / "gpt2-nano")}), progress=False)


def test_ddp_two_gloo_ranks_with_a_trained_tokenizer(bpe_run, data_dir, tmp_path):
    import os
    import subprocess
    import sys

    run, res = bpe_run
    cfg = {"model.preset": "nano", "model.arch": "gpt2", "data.dir": str(data_dir), "data.seq_len": "32", "data.prefetch": "0",
           "optim.batch_tokens": "256", "optim.micro_batch_size": "2", "optim.lr": "3e-3", "optim.warmup_steps": "2",
           "run.dir": str(tmp_path / "ddp"), "run.max_steps": "4", "run.device": "cpu", "run.precision": "fp32",
           "run.eval_every": "0", "run.eval_tokens": "1024", "run.ckpt_every": "2", "run.sample_tokens": "8",
           "run.peak_tflops": "1.0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptforge",
           "train", *[a for k, v in cfg.items() for a in (f"--{k}", v)]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in train_rows(tmp_path / "ddp") if "loss" in r}
    for s in range(4):  # 2 ranks x 2 = 1 process x 4 sequences per micro-batch
        assert losses[s] == pytest.approx(res.losses[s], abs=1e-5)
    assert (tmp_path / "ddp" / "checkpoints" / "step_000004" / tk.TOKENIZER_FILE).is_file()


def test_same_ids_through_sample_eval_and_export(bpe_run, data_dir, tok, corpus_dir, tmp_path, capsys):
    from gptforge.commands.sample import sample

    run, res = bpe_run
    prompt = "def f(x):\n    return x  # 日本 🦙"
    got = sample(str(run), prompt, max_new_tokens=4, temperature=0, seed=0, device="cpu", precision="fp32",
                 out=open(tmp_path / "s.txt", "w"))
    from gptforge.interop.load import load_pretrained
    from gptforge.sampling import generate

    model = load_pretrained(run)
    assert got[0] == generate(model, tok.encode(prompt), max_new_tokens=4, temperature=0)  # the same prompt ids
    assert (tmp_path / "s.txt").read_text().startswith(prompt)
    # eval: the checkpoint's tokenizer and the data's are one; bits per byte printed
    assert cli.main(["eval", str(run), "--data", str(data_dir), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"tokenizer {tok.name}" in out and "bits per byte" in out
    assert cli.main(["eval", str(run), "--data", str(data_dir.parent / "none")]) == 1
    # HF export: AutoTokenizer gives gptforge's ids; the pipeline runs; gptforge reads the export back
    transformers = pytest.importorskip("transformers")
    out_dir = tmp_path / "hf"
    assert cli.main(["export", str(run), "--to-hf", str(out_dir)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out_dir))
    for doc in corpus_docs(corpus_dir) + HOSTILE[:-1]:
        assert hf_tok.encode(doc, add_special_tokens=False) == tok.encode(doc)
    assert hf_tok.model_max_length == 64
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 512 and cfg["eos_token_id"] == cfg["bos_token_id"] == 511
    pipe = transformers.pipeline("text-generation", model=str(out_dir), device="cpu")
    text = pipe("def f(x):", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir))
    ids = hf_model.generate(torch.tensor([tok.encode("def f(x):")]), max_new_tokens=4, do_sample=False)[0].tolist()
    assert text == tok.decode(ids)
    import gptforge

    assert gptforge.load_tokenizer(out_dir).name == tok.name


def test_bits_per_byte_equals_a_hand_computation(bpe_run, data_dir, tok):
    from gptforge.data.loader import ShardLoader
    from gptforge.device import Runtime
    from gptforge.eval.perplexity import evaluate_loss
    from gptforge.interop.load import load_pretrained

    run, _ = bpe_run
    model = load_pretrained(run)
    loader = ShardLoader(data_dir, split="val", batch_size=2, seq_len=32, order="sequential", prefetch=0,
                         vocab_size=512)
    got = evaluate_loss(model, loader, Runtime.make("cpu", "fp32"), token_bytes=tok.token_bytes())
    nats = n_bytes = 0.0
    with torch.no_grad():
        for x, y in loader.iter_epoch():
            logits, _ = model(x)
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), reduction="none")
            for loss, target in zip(losses.tolist(), y.flatten().tolist()):
                b = len(tok.decode_bytes([target])) if target != tok.eot_id else 0  # EOT: in neither sum
                if b:
                    nats, n_bytes = nats + loss, n_bytes + b
    assert got["bytes"] == n_bytes > 0
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)


def test_hellaswag_with_a_trained_tokenizer(bpe_run, tok, tmp_path, capsys):
    from gptforge.eval.hellaswag import render_example, Example

    run, _ = bpe_run
    ex = {"ctx": "def add(a, b):", "endings": ["return a + b", "日本語 🦙", "import os"], "label": 0}
    (tmp_path / "hs.jsonl").write_text(json.dumps(ex) + "\n" + json.dumps({**ex, "ctx": ""}) + "\n")
    tokens, mask = render_example(Example(ex["ctx"], ex["endings"], 0), tok, 64)
    assert tokens[0, : int(mask[0].sum()) + len(tok.encode(ex["ctx"]))].tolist() == tok.encode(ex["ctx"]) + tok.encode(" return a + b")
    assert tokens.max() < 512  # the model's vocabulary, not GPT-2's
    assert cli.main(["eval", str(run), "--hellaswag", str(tmp_path / "hs.jsonl"), "--device", "cpu", "--no-progress"]) == 0
    assert "on 2 examples" in capsys.readouterr().out
