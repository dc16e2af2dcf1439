"""Documents -> tokens in many processes -> fixed-size shards; resumable after kill -9.

The tokenizer (`tokenizer`): "gpt2" (GPT-2's BPE, the default), a trained tokenizer (its
directory, or a prepared data directory whose tokenizer to reuse), or "train:N": first train an
N-id byte-level BPE on a sample of the same sources (data/tokenizer_sample.py). A trained
tokenizer is stored with the data, in `DIR/tokenizer/` (a tokenizer directory), and the manifest
names it and the sha256 of its gptforge-tokenizer.json; its vocabulary sets the shard dtype
(uint16 up to 65,536 ids, else uint32).

Stages, each made of atomically written files, so an interrupted run is continued by running
the same command again and ends byte-identical to an uninterrupted one:

0. documents: read by data/sources.py, only regular files, each handed on in bounded pieces.
   (With train:N the tokenizer is trained first on a sample, data/tokenizer_sample.py, into
   `DIR/tokenizer/`, written atomically: a re-run finds it there.)
1. tokenize (data/parts.py): the pieces go in chunks to `workers` processes (data/encode.py:
   ordered, a bounded number in flight, the tokenizer named by the codec each task carries), each
   document as [EOT] + encode_ordinary(text), into parts `.parts/part_{i:06d}.npy` of about
   min(shard_tokens, 16M) tokens, then `.parts/layout.json`.
2. cut (data/cut.py): the stream is split into val = the first documents, train = the rest, and
   each split into `{split}_{index:06d}.npy` shards of `shard_tokens` tokens. manifest.json is
   written last; then the parts are removed.

A finished directory is recognised without writing anything (no lock taken): re-running on
read-only finished data succeeds.

The validation rule (data/parts.py `val_boundary`): `val_tokens` given -> val is the smallest prefix
of whole documents with at least that many tokens (an error if it would leave train empty). Default -> the target is 0.5% of
all tokens, capped at 10M tokens, but at least `VAL_MIN` tokens (one evaluation pass of the default
config) or 10% of a small corpus, whichever is less (`default_val_tokens`), taken the same way,
but never every document. Where whole documents cannot give between 1x and 2x that default target
(a single long document, such as tinyshakespeare's input.txt; or a first document far longer than
the target) and the target is at least `VAL_CUT_MIN` tokens, val is exactly the first `target`
tokens, cut inside a document. A tiny single-document corpus keeps an empty val split.

The options that shape the output (sources, the fingerprint of the input files, text field, split,
strict, shard size, val tokens, tokenizer) are saved before any work; re-running with others into
the same directory is an error unless `overwrite`. `workers` never changes the output.

Local source paths are recorded portably (`portable_path`): relative to the output directory
where the two share a directory below the filesystem root, else absolute with the home directory
written `~`; so a dataset copied to another machine carries no path of the first one's home. They
are for people to read: the fingerprint, not the recorded path, decides whether the inputs are the
same, so moving the output directory (which changes the relative path) is not a change of options,
and manifests written with absolute paths read as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from gptforge import tokenizer as tokenizer_mod  # `prepare` has a parameter named tokenizer
from gptforge.data import shards
from gptforge.data import sources as _src
from gptforge.data.cut import TOKENIZER_DIR, VAL_RULE, cut
from gptforge.data.encode import Codec, KeepState, default_workers, encode_documents
from gptforge.data.parts import (LAYOUT, MAX_PART_TOKENS, PARTS, VAL_CAP, VAL_CUT_MIN, VAL_FRACTION, VAL_MIN,
                                 VAL_SMALL_FRACTION, default_val_tokens, tokenize)
from gptforge.data.sources import portable_path
from gptforge.data.tokenizer_sample import DEFAULT_MAX_CHARS, train_tokenizer
from gptforge.errors import GPTForgeError
from gptforge.fsutil import cache_root, read_json, remove_stale_tmp, write_json

__all__ = ["prepare", "ensure_default_corpus", "default_cache_dir", "default_workers", "default_val_tokens",
           "portable_path", "encode_documents", "OptionsMismatch", "DEFAULT_SHARD_TOKENS", "STATE", "PARTS", "LAYOUT",
           "LOCK", "TOKENIZER_DIR", "TRAIN_PREFIX", "VAL_RULE", "VAL_FRACTION", "VAL_CAP", "VAL_MIN",
           "VAL_SMALL_FRACTION", "VAL_CUT_MIN", "MAX_PART_TOKENS"]

DEFAULT_SHARD_TOKENS = 100_000_000
STATE = ".prepare-state.json"
LOCK = ".lock"
TRAIN_PREFIX = tokenizer_mod.TRAIN_PREFIX


class OptionsMismatch(GPTForgeError):
    """The output directory holds data prepared (or being prepared) with other options."""


def default_cache_dir() -> Path:
    """$GPTFORGE_CACHE, else $XDG_CACHE_HOME/gptforge, else ~/.cache/gptforge."""
    return cache_root()


def ensure_default_corpus(workers: int | None = None, progress: bool = True, tokenizer: str = "gpt2") -> Path:
    """Prepare `python-stdlib` into <cache>/data/python-stdlib (GPT-2's BPE) or, for tokenizer
    "train:N", <cache>/data/python-stdlib-trainN (its own N-id BPE, trained on it first), unless
    already complete; return it."""
    name = _src.STDLIB if tokenizer == "gpt2" else f"{_src.STDLIB}-{tokenizer.replace(':', '')}"
    out = default_cache_dir() / "data" / name
    existed = (out / shards.MANIFEST).is_file()
    try:
        manifest = prepare([_src.STDLIB], out, workers=workers, progress=progress, tokenizer=tokenizer)
    except OptionsMismatch:  # another Python (another stdlib) prepared it: redo it for this one
        existed = False
        manifest = prepare([_src.STDLIB], out, workers=workers, progress=progress, tokenizer=tokenizer, overwrite=True)
    if progress and not existed:
        print(summary(out, manifest), file=sys.stderr)
    return out


def summary(out: str | os.PathLike, manifest: dict, seconds: float | None = None) -> str:
    """One line: what `out` holds, with the count of source files skipped (each warned about above)."""
    docs = manifest["documents"]
    parts = [f"{name}: {body['num_tokens']:,} tokens, {body['num_documents']:,} documents, {len(body['shards'])} shards"
             for name, body in sorted(manifest["splits"].items(), key=lambda kv: kv[0] != "val") if body["shards"]]
    n = docs.get("files_skipped", 0)
    skipped = f", {n} files skipped" if n else ""
    took = "" if seconds is None else f"{seconds:.1f}s, "
    return f"{out}: " + "; ".join(parts) + f"{skipped} ({took}tokenizer {manifest['tokenizer']})"


# ---------------------------------------------------------------------------------------------
# the output directory: options, lock, state


def _portable_spec(src: _src.Source, out: Path) -> str:
    return src.spec if src.is_hf or src.spec == _src.STDLIB else portable_path(src.spec, out)


def _same_options(old: dict | None, new: dict) -> bool:
    """Equal but for the recorded source paths (the fingerprint covers the sources themselves)."""
    if not isinstance(old, dict):
        return False
    return {k: v for k, v in old.items() if k != "sources"} == {k: v for k, v in new.items() if k != "sources"}


def _options(srcs: list[_src.Source], *, shard_tokens, val_tokens, text_field, split, strict, out: Path,
             tok_spec: dict) -> dict:
    return {
        "sources": [_portable_spec(s, out) for s in srcs],
        "inputs_sha256": _src.fingerprint(srcs),
        "text_field": text_field,
        "split": split,
        "strict": strict,
        "shard_tokens": shard_tokens,
        "val_tokens": "auto" if val_tokens is None else val_tokens,
        **tok_spec,  # gpt2: {"tokenizer": "gpt2", "vocab_size": 50257}, as before trained tokenizers
    }


def _diff(old: dict, new: dict) -> str:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or (key == "sources" and old.get("inputs_sha256") == new.get("inputs_sha256")):
            continue  # the same inputs, recorded from another place
        if key == "inputs_sha256":
            out.append("the input files changed (size, modification time or place)")
        else:
            ra, rb = repr(a), repr(b)
            out.append(f"{key} {ra[:60]} -> {rb[:60]}")
    return ", ".join(out) or "unknown differences"


@contextlib.contextmanager
def _locked(out: Path, progress: bool):
    """One preparation per directory at a time (e.g. every torchrun rank calling ensure_default_corpus)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"gptforge: waiting for another process preparing {out}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _clear(out: Path) -> None:
    """Remove everything prepare writes in `out` (and nothing else)."""
    for p in shards.listed_files(out):
        p.unlink()
    for name in (shards.MANIFEST, STATE):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    shutil.rmtree(out / PARTS, ignore_errors=True)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    remove_stale_tmp(out)


def _read_state(path: Path) -> dict:
    return read_json(path, hint="; pass --overwrite to prepare again")


def _done(out: Path, options: dict) -> dict | None:
    """The manifest if `out` holds this exact preparation, finished and cleaned up: nothing to
    write, so no lock to take (read-only finished data prepares again); None otherwise."""
    if not (out / shards.MANIFEST).is_file() or (out / PARTS).exists() or (out / STATE).exists():
        return None
    with contextlib.suppress(GPTForgeError, OSError):
        if not _same_options(_read_state(out / shards.MANIFEST).get("options"), options):
            return None  # the locked path below says how they differ
        manifest = shards.read_manifest(out)
        for split in manifest["splits"]:
            shards.open_split(out, split, manifest)  # cheap checks: a damaged result is not "done"
        return manifest
    return None


def _finished(out: Path, options: dict, overwrite: bool) -> dict | None:
    """The manifest if `out` already holds this exact preparation; None to (re)start work."""
    if overwrite:
        _clear(out)
        return None
    if (out / shards.MANIFEST).exists():
        manifest = _read_state(out / shards.MANIFEST)
        old = manifest.get("options")
        if not _same_options(old, options):
            raise OptionsMismatch(
                f"{out}: already holds shards prepared with other options ({_diff(old or {}, options)}); "
                "pass --overwrite to replace them"
            )
        manifest = shards.read_manifest(out)
        for split in manifest["splits"]:
            shards.open_split(out, split, manifest)  # cheap checks: a damaged result is not "done"
        shutil.rmtree(out / PARTS, ignore_errors=True)  # killed after the manifest, before cleanup
        with contextlib.suppress(FileNotFoundError):
            (out / STATE).unlink()
        return manifest
    if (out / STATE).exists():
        old = _read_state(out / STATE).get("options")
        if not _same_options(old, options):
            raise OptionsMismatch(
                f"{out}: holds an unfinished preparation with other options ({_diff(old or {}, options)}); "
                "re-run that command to finish it, or pass --overwrite"
            )
        return None
    if shards.listed_files(out):
        raise GPTForgeError(f"{out}: holds shard files but no {shards.MANIFEST}; pass --overwrite to replace them")
    return None


# ---------------------------------------------------------------------------------------------


def _tokenizer_choice(spec, max_chars: int, pattern: str) -> tuple[dict, tokenizer_mod.Tokenizer | None]:
    """The options that name the tokenizer, and the tokenizer (None for train:N: trained later)."""
    n = tokenizer_mod.parse_train(spec)
    if n is not None:
        if pattern not in tokenizer_mod.PATTERNS:
            raise GPTForgeError(f"tokenizer pattern {pattern!r}: expected one of {', '.join(tokenizer_mod.PATTERNS)}")
        if not isinstance(max_chars, int) or max_chars < 1:
            raise GPTForgeError(f"--tokenizer-max-chars must be a positive integer, got {max_chars!r}")
        return {"tokenizer": f"{TRAIN_PREFIX}{n}", "vocab_size": n, "tokenizer_pattern": pattern,
                "tokenizer_max_chars": max_chars}, None
    tok = tokenizer_mod.resolve(spec)
    return {"tokenizer": tok.name, "vocab_size": tok.vocab_size}, tok


def _stored_tokenizer(out: Path, tok: tokenizer_mod.Tokenizer | None, options: dict, resumed: bool, srcs,
                      warn) -> tokenizer_mod.Tokenizer:
    """The preparation's tokenizer, stored in out/tokenizer/ when trained: trained there first
    (train:N; a re-run after an interruption finds it), or copied there."""
    tdir = out / TOKENIZER_DIR
    if tok is not None and not tok.trained:
        return tok
    if tok is None:
        if resumed and (tdir / tokenizer_mod.TOKENIZER_FILE).is_file():
            return tokenizer_mod.Tokenizer.load(tdir)
        shutil.rmtree(tdir, ignore_errors=True)
        return train_tokenizer(srcs, tdir, options["vocab_size"], max_chars=options["tokenizer_max_chars"],
                               pattern=options["tokenizer_pattern"], text_field=options["text_field"],
                               split=options["split"], strict=options["strict"], progress=warn.progress, warn=warn)
    with contextlib.suppress(GPTForgeError):
        if tokenizer_mod.Tokenizer.load(tdir).name == tok.name:
            return tokenizer_mod.Tokenizer.load(tdir)
    tok.save(tdir, overwrite=True)
    return tokenizer_mod.Tokenizer.load(tdir)


class _Warnings:
    """Warnings printed once each above the progress bars, however many passes read the sources."""

    def __init__(self, progress: bool) -> None:
        self.progress, self.seen = progress, set()

    def __call__(self, msg: str) -> None:
        if msg not in self.seen:
            self.seen.add(msg)
            tqdm.write(f"gptforge: warning: {msg}", file=sys.stderr)  # not through the bar


def _check_args(srcs, shard_tokens, val_tokens, workers, text_field) -> None:
    problems = []
    if isinstance(srcs, (str, os.PathLike)):
        problems.append("sources must be a list of source names, not one string")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        problems.append(f"--shard-tokens must be a positive integer, got {shard_tokens!r}")
    if val_tokens is not None and (not isinstance(val_tokens, int) or val_tokens < 0):
        problems.append(f"--val-tokens must be an integer >= 0, got {val_tokens!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        problems.append(f"--workers must be a positive integer, got {workers!r}")
    if not text_field:
        problems.append("--text-field must not be empty")
    if problems:
        raise GPTForgeError("; ".join(problems))


def prepare(
    sources: list[str],
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_tokens: int | None = None,
    workers: int | None = None,
    text_field: str = "text",
    split: str = "train",
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tokenizer: "str | os.PathLike | tokenizer_mod.Tokenizer" = "gpt2",
    tokenizer_max_chars: int | None = None,
    tokenizer_pattern: str | None = None,
) -> dict:
    """Tokenize `sources` into shards in `out_dir` and return the manifest (see the module doc).
    tokenizer: "gpt2", "train:N", a tokenizer directory or file, a prepared data directory (its
    tokenizer), or a Tokenizer. tokenizer_max_chars / tokenizer_pattern: for train:N.

    Re-running after an interruption continues; re-running when done returns the manifest at once.
    """
    _check_args(sources, shard_tokens, val_tokens, workers, text_field)
    tok_spec, tok = _tokenizer_choice(tokenizer, tokenizer_max_chars or DEFAULT_MAX_CHARS,
                                      tokenizer_pattern or tokenizer_mod.DEFAULT_PATTERN)
    srcs = _src.resolve_all(sources)
    out = Path(out_dir).expanduser()
    options = _options(srcs, shard_tokens=shard_tokens, val_tokens=val_tokens, text_field=text_field, split=split,
                       strict=strict, out=out, tok_spec=tok_spec)
    if not overwrite and (manifest := _done(out, options)) is not None:
        return manifest
    workers = workers or default_workers()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPTForgeError(f"{out}: cannot create the output directory ({e.strerror})") from e
    warn = _Warnings(progress)
    with _locked(out, progress):
        manifest = _finished(out, options, overwrite)
        if manifest is not None:
            return manifest
        parts = out / PARTS
        remove_stale_tmp(out)
        remove_stale_tmp(parts)
        resumed = (out / STATE).exists()
        if not resumed:
            write_json(out / STATE, {"options": options})
        try:
            tok = _stored_tokenizer(out, tok, options, resumed, srcs, warn)
            if (parts / LAYOUT).exists():
                layout = _read_state(parts / LAYOUT)
            else:
                layout = tokenize(srcs, parts, options, Codec.of(tok), workers, progress, warn,
                                  lambda f: portable_path(f, out))
        except GPTForgeError as e:
            if not isinstance(e, KeepState):
                _clear(out)  # an input problem: the unfinished work cannot be resumed as is
            raise
        manifest = cut(out, parts, layout, options, tok, progress)
        shards.write_manifest(out, manifest)
        shutil.rmtree(parts, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (out / STATE).unlink()
        return manifest
