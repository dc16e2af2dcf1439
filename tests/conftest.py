"""Shared fixtures: a small real-text corpus and its prepared shards, made once per session."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

# a few standard-library modules: real text, present everywhere, deterministic
CORPUS_MODULES = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py",
                  "shlex.py", "colorsys.py", "keyword.py", "abc.py", "copy.py", "struct.py"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_MODULES:
        shutil.copy(stdlib / name, d / (name + ".txt"))
    return d


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, corpus_dir) -> Path:
    """~40k tokens of Python source in several shards, with a ~4k-token validation split."""
    from gptforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare([str(corpus_dir)], out, shard_tokens=8192, val_tokens=4096, workers=1, progress=False)
    return out
