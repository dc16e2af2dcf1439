"""gptforge.data.sources: every input format, deterministic order, and every bad input's message."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the datasets tests read local files only
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from gptforge.data import sources  # noqa: E402
from gptforge.errors import GPTForgeError  # noqa: E402


def docs_of(specs, **kw) -> list[str]:
    return list(sources.iter_documents(sources.resolve_all([str(s) for s in specs]), **kw))


def write_jsonl(path: Path, records, gz: bool = False) -> None:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def write_parquet(path: Path, texts, row_group_size: int = 2, field: str = "text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """One file of every supported type, nested, plus files that must be ignored."""
    root = tmp_path / "corpus"
    (root / "b_dir" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text\nwith two lines\n")
    (root / "b_dir" / "c.md").write_text("# gamma\n")
    (root / "b_dir" / "deeper" / "d.txt.gz").write_bytes(gzip.compress("delta é ü 漢字".encode()))
    write_jsonl(root / "b_dir" / "e.jsonl", [{"text": "epsilon 1"}, {"text": ""}, {"text": None}, {"text": "epsilon 2", "x": 1}])
    with open(root / "b_dir" / "e.jsonl", "ab") as f:
        f.write(b"\n   \n")  # blank lines are not records
    write_jsonl(root / "f.jsonl.gz", [{"text": "zeta"}], gz=True)
    write_parquet(root / "g.parquet", ["eta 1", "eta 2", None, "eta 3", "eta 4"])
    (root / "notes.csv").write_text("ignored,type\n")
    (root / ".hidden.txt").write_text("hidden file")
    (root / ".git").mkdir()
    (root / ".git" / "x.txt").write_text("hidden dir")
    return root


def test_directory_reads_every_type_recursively_in_sorted_order(corpus):
    stats = sources.SourceStats()
    docs = docs_of([corpus], stats=stats)
    assert docs == [
        "alpha text\nwith two lines\n",  # a.txt
        "# gamma\n",  # b_dir/c.md
        "delta é ü 漢字",  # b_dir/deeper/d.txt.gz
        "epsilon 1", "epsilon 2",  # b_dir/e.jsonl (empty and null texts dropped)
        "zeta",  # f.jsonl.gz
        "eta 1", "eta 2", "eta 3", "eta 4",  # g.parquet, 3 row groups
    ]
    assert stats.documents == 10 and stats.empty == 3 and stats.files_read == 6 and not stats.skipped
    assert docs_of([corpus]) == docs  # deterministic


def test_sources_mix_in_the_given_order(corpus):
    a, f = corpus / "a.txt", corpus / "f.jsonl.gz"
    assert docs_of([f, a, f]) == ["zeta", "alpha text\nwith two lines\n", "zeta"]


def test_text_field_selects_the_jsonl_and_parquet_field(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"body": "one", "text": "no"}, {"body": "two", "text": "no"}])
    write_parquet(tmp_path / "y.parquet", ["three", "four"], field="body")
    assert docs_of([tmp_path / "x.jsonl", tmp_path / "y.parquet"], text_field="body") == ["one", "two", "three", "four"]


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    write_parquet(tmp_path / "big.parquet", [f"row {i}" for i in range(10)], row_group_size=3)
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 3)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    batches = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        for b in real(self, *a, **k):
            batches.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    assert docs_of([tmp_path / "big.parquet"]) == [f"row {i}" for i in range(10)]
    assert max(batches) <= 3 and sum(batches) == 10


def test_python_stdlib_is_the_standard_library_without_site_packages():
    src = sources.resolve("python-stdlib")
    names = [p.relative_to(sources.stdlib_root()).as_posix() for p in src.files]
    assert len(names) > 500 and "os.py" in names and "json/decoder.py" in names
    assert all(n.endswith(".py") for n in names)
    assert not any(part in ("site-packages", "dist-packages") for n in names for part in n.split("/"))
    assert [tuple(n.split("/")) for n in names] == sorted(tuple(n.split("/")) for n in names)
    assert sources.resolve("python-stdlib").files == src.files


def test_hf_sources_are_streamed_through_datasets(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "first"}, {"text": "second"}, {"content": "x", "text": "third"}])
    docs = list(sources.hf_documents("json", None, "train", "text", data_files=str(tmp_path / "d.jsonl")))
    assert docs == ["first", "second", "third"]
    ds = sources.load_hf_streaming("json", None, "train", data_files=str(tmp_path / "d.jsonl"))
    assert type(ds).__name__ == "IterableDataset"  # streaming: nothing loaded whole

    # hf:NAME[:CONFIG] reaches load_dataset(NAME, CONFIG, split=..., streaming=True)
    calls = []
    real = sources.load_hf_streaming

    def fake(name, config, split, **kw):
        calls.append((name, config, split))
        return real("json", None, "train", data_files=str(tmp_path / "d.jsonl"))

    monkeypatch.setattr(sources, "load_hf_streaming", fake)
    assert docs_of(["hf:someone/corpus:cfg"], split="validation") == ["first", "second", "third"]
    assert calls == [("someone/corpus", "cfg", "validation")]


def test_hf_missing_field_and_bad_names(tmp_path):
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "d.jsonl", [{"content": "x"}])
    with pytest.raises(GPTForgeError, match=r"hf:json split train: record 0 has no field 'text' \(fields: content\)"):
        list(sources.hf_documents("json", None, "train", "text", data_files=str(tmp_path / "d.jsonl")))
    assert sources.parse_hf("hf:wikitext:wikitext-103-raw-v1") == ("wikitext", "wikitext-103-raw-v1")
    assert sources.parse_hf("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None)
    with pytest.raises(GPTForgeError, match="expected hf:NAME"):
        sources.resolve("hf:")
    def broken():
        yield {"text": "fine"}
        raise ConnectionError("stream\nreset")

    with pytest.raises(GPTForgeError, match=r"^where: reading record 1 failed: ConnectionError: stream reset$"):
        list(sources.dataset_documents(broken(), "text", "where"))
    with pytest.raises(GPTForgeError, match=r"hf:json: cannot open split 'nope'"):
        sources.load_hf_streaming("json", None, "nope", data_files=str(tmp_path / "d.jsonl"))


# --------------------------------------------------------------------------- bad inputs


def test_non_utf8_file_is_skipped_counted_and_warned_or_fatal_with_strict(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    write_jsonl(tmp_path / "mixed.jsonl", [{"text": "ok line"}])
    with open(tmp_path / "mixed.jsonl", "ab") as f:
        f.write(b'{"text": "bad \xff byte"}\n')
    warnings: list[str] = []
    stats = sources.SourceStats()
    assert docs_of([tmp_path], stats=stats, warn=warnings.append) == ["fine"]  # mixed.jsonl skipped whole
    assert [Path(p).name for p, _ in stats.skipped] == ["latin1.txt", "mixed.jsonl"]
    assert warnings[0] == f"skipping {tmp_path / 'latin1.txt'}: not valid UTF-8 (byte 0xe9 at offset 3)"
    assert "mixed.jsonl: not valid UTF-8 (byte 0xff at offset 34)" in warnings[1]
    with pytest.raises(GPTForgeError, match=r"latin1\.txt: not valid UTF-8 \(byte 0xe9 at offset 3\) \(without --strict"):
        docs_of([tmp_path], strict=True, warn=warnings.append)


def test_unreadable_files_are_skipped(tmp_path):
    (tmp_path / "ok.txt").write_text("ok")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (tmp_path / "notgzip.txt.gz").write_bytes(b"plain bytes, not gzip")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    warnings: list[str] = []
    stats = sources.SourceStats()
    assert docs_of([tmp_path], stats=stats, warn=warnings.append) == ["ok"]
    reasons = {Path(p).name: why for p, why in stats.skipped}
    assert set(reasons) == {"dangling.txt", "notgzip.txt.gz", "cut.jsonl.gz", "junk.parquet"}
    assert reasons["dangling.txt"].startswith("unreadable (No such file")
    assert reasons["junk.parquet"].startswith("unreadable as parquet")
    assert len(warnings) == 4
    with pytest.raises(GPTForgeError, match=r"cut\.jsonl\.gz: unreadable \(Compressed file ended"):
        docs_of([tmp_path], strict=True, warn=warnings.append)


def test_warnings_stop_after_a_few_but_every_skip_is_counted(tmp_path):
    for i in range(sources.MAX_WARNINGS + 5):
        (tmp_path / f"bad{i:02d}.txt").write_bytes(b"\xff")
    (tmp_path / "good.txt").write_text("g")
    warnings: list[str] = []
    stats = sources.SourceStats()
    assert docs_of([tmp_path], stats=stats, warn=warnings.append) == ["g"]
    assert len(stats.skipped) == sources.MAX_WARNINGS + 5 and len(warnings) == sources.MAX_WARNINGS + 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: write_jsonl(d / "x.jsonl", [{"text": "a"}, {"body": "b"}]),
         r"x\.jsonl line 2: no field 'text' \(fields: body\); choose one with --text-field"),
        (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n{"text": oops}\n'),
         r"x\.jsonl line 2: not valid JSON \(Expecting value at column 10\)"),
        (lambda d: (d / "x.jsonl").write_text('["text"]\n'), r"x\.jsonl line 1: expected a JSON object, got list"),
        (lambda d: write_jsonl(d / "x.jsonl", [{"text": 5}]), r"x\.jsonl line 1: field 'text' is int, expected a string"),
        (lambda d: write_parquet(d / "x.parquet", ["a"], field="body"),
         r"x\.parquet: no column 'text' \(columns: body, id\); choose one with --text-field"),
        (lambda d: __import__("pyarrow.parquet").parquet.write_table(__import__("pyarrow").table({"text": [1, 2]}), d / "x.parquet"),
         r"x\.parquet: column 'text' has type int64, expected a string column"),
    ],
    ids=["jsonl-missing-field", "jsonl-bad-json", "jsonl-not-object", "jsonl-not-string", "parquet-missing-column", "parquet-not-string"],
)
def test_bad_records_are_errors_naming_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(GPTForgeError, match=message):
        docs_of([tmp_path])


def test_bad_source_names(tmp_path):
    with pytest.raises(GPTForgeError, match=r"source .*missing\.txt: no such file or directory"):
        sources.resolve(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(GPTForgeError, match=r"data\.csv: unsupported file type; expected \.txt, \.md"):
        sources.resolve(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.csv").write_text("x")
    with pytest.raises(GPTForgeError, match=r"empty: directory holds no \.txt, \.md"):
        sources.resolve(str(tmp_path / "empty"))
    with pytest.raises(GPTForgeError, match="no sources given"):
        sources.resolve_all([])


def test_fingerprint_changes_with_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    fp = sources.fingerprint(sources.resolve_all([str(tmp_path)]))
    assert sources.fingerprint(sources.resolve_all([str(tmp_path)])) == fp
    (tmp_path / "a.txt").write_text("one more")
    assert sources.fingerprint(sources.resolve_all([str(tmp_path)])) != fp


def test_pieces_are_cut_where_no_pretokenizer_matches_across(tmp_path):
    """Every pattern splits the pieces' text exactly as the whole text: the same tokens."""
    import random

    import regex

    from gptforge.tokenizer import PATTERNS

    rng = random.Random(0)
    alphabet = list("ab c\n\n  \t'sd12345.!?,漢字🙂 ") + ["  ", "\n ", " \n", "'ll", "'s ", "\r\n"]
    for _ in range(10):
        text = "".join(rng.choice(alphabet) for _ in range(20_000))
        pieces = list(sources.split_pieces((text[i : i + 777] for i in range(0, len(text), 777)), size=300, max_size=5000))
        assert "".join(pieces) == text and len(pieces) > 30 and max(map(len, pieces)) <= 5000
        for pattern in PATTERNS.values():
            r = regex.compile(pattern)
            assert [t for p in pieces for t in r.findall(p)] == r.findall(text)
    assert list(sources.split_pieces(["x" * 12_000], size=300, max_size=5000)) == ["x" * 5000] * 2 + ["x" * 2000]
    assert list(sources.split_pieces([])) == [""]
