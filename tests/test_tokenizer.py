"""The offline GPT-2 tokenizer. Every test builds it from the local BPE files: tiktoken's cache is
pointed at an empty directory, so a cache left on the machine can neither hide a broken local
path nor make the corrupted-file test pass for the wrong reason."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from gptforge import tokenizer as tk
from gptforge.errors import GPTForgeError


@pytest.fixture(autouse=True)
def local_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.delenv("GPTFORGE_BPE_DIR", raising=False)
    tk.get_encoding.cache_clear()
    yield
    tk.get_encoding.cache_clear()  # later tests get a fresh, healthy encoding


def test_built_from_local_files():
    assert tk._cached_tiktoken_encoding() is None
    enc = tk.get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_empty_tiktoken_cache_dir_means_local_files(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: caching off, it would download
    assert tk._cached_tiktoken_encoding() is None
    assert tk.Tokenizer().encode("Hello world") == [15496, 995]


def test_hello_world():
    assert tk.Tokenizer().encode("Hello world") == [15496, 995]
    assert tk.Tokenizer().encode(" Hello world") == [18435, 995]


@pytest.mark.parametrize(
    "text",
    ["", "naïve café", "日本語のテキスト", "emoji 🦙🔥 and 👩‍👩‍👧", "e\u0301 combining", "tabs\tand\n\nnewlines  ", "Ünïcödé ∑ ∫ ≠"],
)
def test_unicode_round_trip(text):
    t = tk.Tokenizer()
    ids = t.encode(text)
    assert t.decode(ids) == text
    assert t.decode_bytes(ids) == text.encode("utf-8")


def test_eot_handling():
    t = tk.Tokenizer()
    assert t.eot_id == tk.EOT_ID == 50256 and t.vocab_size == 50257
    assert t.encode("<|endoftext|>", allow_eot=True) == [50256]
    as_text = t.encode("<|endoftext|>")  # plain text by default: never the special token
    assert 50256 not in as_text and t.decode(as_text) == "<|endoftext|>"
    assert t.encode("a<|endoftext|>b", allow_eot=True) == t.encode("a") + [50256] + t.encode("b")
    assert t.decode([50256]) == "<|endoftext|>"


def test_batch_encode_matches_single():
    t = tk.Tokenizer()
    texts = ["Hello world", "naïve 🦙", "", "x" * 1000]
    assert t.encode_ordinary_batch(texts, num_threads=2) == [t.encode(s) for s in texts]


@pytest.mark.parametrize("victim", ["vocab.bpe", "encoder.json"])
def test_corrupted_vocab_file_is_a_clear_error(tmp_path, monkeypatch, victim):
    vocab_bpe, encoder_json = tk.bpe_files()
    copy = tmp_path / "bpe"
    copy.mkdir()
    shutil.copy(vocab_bpe, copy / "vocab.bpe")
    shutil.copy(encoder_json, copy / "encoder.json")
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (copy / victim).write_bytes(bytes(data))
    monkeypatch.setenv("GPTFORGE_BPE_DIR", str(copy))
    tk.get_encoding.cache_clear()
    with pytest.raises(GPTForgeError, match=rf"{victim} is corrupted or not GPT-2's: sha256 [0-9a-f]{{64}}, expected"):
        tk.Tokenizer()


def test_missing_vocab_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_BPE_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(GPTForgeError, match="cannot read GPT-2 BPE file .*vocab.bpe"):
        tk.get_encoding()


def test_tiktoken_cache_when_present_gives_the_same_tokens(tmp_path, monkeypatch):
    """Where tiktoken's own gpt2 files are cached, that encoding is used; it must agree. The
    cache is faked from the local files under tiktoken's keys (sha1 of the download URL)."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    vocab_bpe, encoder_json = tk.bpe_files()
    for name, src in (("vocab.bpe", vocab_bpe), ("encoder.json", encoder_json)):
        shutil.copy(src, cache / hashlib.sha1((tk._URL + name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    cached = tk._cached_tiktoken_encoding()
    assert cached is not None
    text = "Hello world, naïve 🦙 <|endoftext|> done"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # caching off: nothing read from or written to a cache
    local = tk._local_encoding()
    assert cached.encode(text, allowed_special="all") == local.encode(text, allowed_special="all")


# --------------------------------------------------------------------------- the one resolver


def _trained() -> tk.Tokenizer:
    return tk.Tokenizer.from_ranks([bytes([b]) for b in range(256)] + [b"th", b"he", b"the"], "gpt2")


def test_resolve_takes_whatever_names_a_tokenizer(tmp_path):
    import json

    tok = _trained()
    tok.save(tmp_path / "tok")
    assert tk.resolve(None).name == tk.resolve("gpt2").name == tk.NAME
    assert tk.resolve(tok) is tok
    for spec in (tmp_path / "tok", tmp_path / "tok" / tk.TOKENIZER_FILE, str(tmp_path / "tok")):
        assert tk.resolve(spec).name == tok.name
    data = tmp_path / "data"  # a prepared data directory names its tokenizer in manifest.json
    tok.save(data / "tokenizer")
    manifest = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                "tokenizer_file": f"tokenizer/{tk.TOKENIZER_FILE}", "tokenizer_sha256": tk.resolve(data / "tokenizer").file_sha256}
    (data / tk.MANIFEST).write_text(json.dumps(manifest))
    assert tk.resolve(data).name == tk.resolve(data / tk.MANIFEST).name == tok.name
    model = tmp_path / "model"  # a checkpoint's config.json records its tokenizer beside the weights
    model.mkdir()
    (model / tk.TOKENIZER_FILE).write_bytes(tok.file_bytes())
    (model / tk.MODEL_CONFIG).write_text(json.dumps({"model": {"vocab_size": tok.vocab_size}, "tokenizer": tok.identity()}))
    assert tk.resolve(model).name == tok.name
    hf = tmp_path / "hf"  # a Hugging Face GPT-2 directory
    hf.mkdir()
    (hf / tk.MODEL_CONFIG).write_text(json.dumps({"vocab_size": tk.N_VOCAB}))
    assert tk.resolve(hf).name == tk.NAME
    assert tk.resolve("somewhere", locate=lambda s: model).name == tok.name  # a run dir / hub name, located


def test_resolve_says_what_it_cannot_take(tmp_path):
    import json

    with pytest.raises(GPTForgeError, match="train:300: names a tokenizer still to be trained"):
        tk.resolve("train:300")
    with pytest.raises(GPTForgeError, match="train:N with N the vocabulary size"):
        tk.resolve("train:lots")
    with pytest.raises(GPTForgeError, match="nowhere: names no tokenizer"):
        tk.resolve(tmp_path / "nowhere")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / tk.MODEL_CONFIG).write_text(json.dumps({"vocab_size": 1000}))
    with pytest.raises(GPTForgeError, match=r"no gptforge-tokenizer\.json, and its vocabulary \(1000\) is not GPT-2's"):
        tk.resolve(tmp_path / "hf")
    data = tmp_path / "data"
    data.mkdir()
    (data / tk.MANIFEST).write_text(json.dumps({"tokenizer": "x", "vocab_size": 300, "eot_id": 299,
                                                 "tokenizer_file": "../elsewhere.json", "tokenizer_sha256": "0" * 64}))
    with pytest.raises(GPTForgeError, match="must lie inside the data directory"):
        tk.resolve(data)
