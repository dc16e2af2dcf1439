"""Shared fixtures: a small real-text corpus and its prepared shards, made once per session."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

# cuBLAS reads this when it starts: deterministic GEMMs where a test asks for deterministic
# algorithms (tests/test_gpu.py); harmless elsewhere
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

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


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
