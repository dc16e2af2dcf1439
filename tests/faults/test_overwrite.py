"""`--overwrite` replaces only what it was asked to: never a sibling `OUT.old` the user did not name,
never the input (an output that is, contains or is inside it), never a non-empty directory of
another kind (a run, a data directory, a folder of the user's files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gptforge import config as C
from gptforge.training.trainer import train

from .conftest import NANO, assert_one_line_error, tree_digest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shards_dir) -> Path:
    run = tmp_path_factory.mktemp("overwrite") / "run"
    over = dict(NANO, **{"data.dir": str(shards_dir), "run.dir": str(run), "run.max_steps": "2",
                         "run.ckpt_every": "1", "run.sample_tokens": "0"})
    train(C.resolve(None, list(over.items())), progress=False)
    return run


@pytest.fixture
def run(tmp_path, trained_run) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def keepsake(directory: Path) -> Path:
    directory.mkdir()
    f = directory / "keep.txt"
    f.write_text("the user's\n")
    return f


def test_export_overwrite_leaves_a_sibling_dot_old(tmp_path, run, gf):
    out = tmp_path / "hf"
    assert gf("export", str(run), "--to-hf", str(out)).returncode == 0
    keep = keepsake(tmp_path / "hf.old")
    r = gf("export", str(run), "--to-hf", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert keep.read_text() == "the user's\n", "--overwrite deleted OUT.old"
    assert (out / "model.safetensors").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_import_hf_overwrite_leaves_a_sibling_dot_old(tmp_path, run, gf):
    hf = tmp_path / "hf"
    assert gf("export", str(run), "--to-hf", str(hf)).returncode == 0
    out = tmp_path / "ckpt"
    assert gf("import-hf", str(hf), "--out", str(out)).returncode == 0
    keep = keepsake(tmp_path / "ckpt.old")
    r = gf("import-hf", str(hf), "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert keep.read_text() == "the user's\n", "--overwrite deleted OUT.old"
    assert (out / "model.safetensors").is_file()


def test_tokenizer_train_overwrite_leaves_a_sibling_dot_old(tmp_path, corpus_dir, gf):
    out = tmp_path / "tok"
    args = ("tokenizer", "train", str(corpus_dir), "--vocab-size", "300", "--max-chars", "20000", "--quiet",
            "--out", str(out))
    assert gf(*args).returncode == 0
    keep = keepsake(tmp_path / "tok.old")
    r = gf(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert keep.read_text() == "the user's\n", "--overwrite deleted OUT.old"
    assert (out / "gptforge-tokenizer.json").is_file()


def test_export_into_the_run_it_reads_is_refused(tmp_path, run, gf):
    before = tree_digest(run)
    ckpt = run / "checkpoints" / "step_000002"
    for source, out in [(run, run), (ckpt, run), (ckpt, ckpt), (run, run / "checkpoints"), (ckpt, ckpt / "hf"),
                        (run, run / "hf")]:
        r = gf("export", str(source), "--to-hf", str(out), "--overwrite")
        assert_one_line_error(r, "export", str(out))
        assert tree_digest(run) == before, f"export {source} --to-hf {out} --overwrite changed the run"


def test_overwrite_refuses_a_directory_of_another_kind(tmp_path, run, shards_dir, corpus_dir, gf):
    ckpt = run / "checkpoints" / "step_000002"
    mine = tmp_path / "mine"
    keepsake(mine)
    data = tmp_path / "data"
    shutil.copytree(shards_dir, data)
    other_run = tmp_path / "other_run"
    shutil.copytree(run, other_run)
    for target in (mine, data, other_run):
        before = tree_digest(target)
        r = gf("export", str(ckpt), "--to-hf", str(target), "--overwrite")
        assert_one_line_error(r, "export", str(target))
        assert tree_digest(target) == before
    hf = tmp_path / "hf"
    assert gf("export", str(ckpt), "--to-hf", str(hf)).returncode == 0
    for target in (mine, data, hf, other_run / "checkpoints" / "step_000001"):  # a training checkpoint is not an import's
        before = tree_digest(target)
        r = gf("import-hf", str(hf), "--out", str(target), "--overwrite")
        assert_one_line_error(r, "import-hf", str(target))
        assert tree_digest(target) == before
    for target in (mine, data, hf):
        before = tree_digest(target)
        r = gf("tokenizer", "train", str(corpus_dir), "--vocab-size", "300", "--max-chars", "20000", "--quiet", "--out", str(target),
               "--overwrite")
        assert r.returncode == 1 and str(target) in r.stderr, r.stderr
        assert tree_digest(target) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gf("export", str(ckpt), "--to-hf", str(empty), "--overwrite").returncode == 0  # an empty one is fine
