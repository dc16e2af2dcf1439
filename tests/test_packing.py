"""data.packing bestfit: rows start on documents, no token lost, exact resume, ranks, errors."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch

from gptforge import config as C
from gptforge.data import packing as pk
from gptforge.data import shards
from gptforge.data.loader import ShardLoader
from gptforge.errors import GPTForgeError

VOCAB, EOT = 50257, 50256
T, B = 16, 4


def make_corpus(path, seed=0, num_docs=300):
    """Documents of distinct tokens: token id v + 1 is (document, position) = where[v] (ids under
    50,000, every one used once), a document being an EOT then its tokens; a prefix of tokens
    before the first EOT, documents of one token (EOT only), some longer than several rows, and
    shards of odd sizes so that documents cross shard boundaries."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice([1, 2, 5, 9, 17, 18, 30, 60], size=num_docs).tolist()
    lengths[3] = 150  # several rows long
    stream, where, nxt = [], {}, 1
    prefix = [nxt + k for k in range(7)]  # the split's first document has no EOT
    for k, v in enumerate(prefix):
        where[v] = (0, k)
    nxt += len(prefix)
    stream += prefix
    for d, n in enumerate(lengths, start=1):
        stream.append(EOT)
        for k in range(1, n):
            where[nxt] = (d, k)
            stream.append(nxt)
            nxt += 1
    assert nxt < 50000
    tokens = np.array(stream, dtype=np.uint16)
    cuts = [0, 101, 1003, 1400, tokens.size // 2, tokens.size]
    train = [tokens[a:b] for a, b in zip(cuts, cuts[1:])]
    shards.write_dataset(path, {"train": iter(train), "val": iter([tokens[:300]])}, vocab_size=VOCAB, eot_id=EOT,
                         tokenizer="gpt2")
    doc_lengths = [len(prefix)] + lengths
    return path, where, doc_lengths


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "data")


def loader(path, **kw):
    kw = {"batch_size": B, "seq_len": T, "packing": "bestfit", **kw}
    return ShardLoader(path, **kw)


def one_epoch_rows(ld) -> list[list[int]]:
    """Every row of the loader's first epoch, in order (a loader with world_size 1)."""
    rows, n = [], ld.bestfit.stats().rows
    while len(rows) < n:
        x, y = ld.next_batch()
        rows += [rx + ry[-1:] for rx, ry in zip(x.tolist(), y.tolist())]
    return rows[:n]


def test_group_packer_fills_rows_whole_and_places_every_token():
    lengths = [3, 40, 1, 17, 17, 9, 2, 33, 5]
    g = pk.pack_group(lengths, T)
    covered = Counter()
    for r in range(g.rows):
        segs = g.segments(r)
        assert sum(n for _, _, n in segs) == T + 1
        for i, (d, off, n) in enumerate(segs):
            assert i == 0 or off == 0  # a continuation only starts a row
            assert 0 <= off and off + n <= lengths[d]
            covered.update((d, k) for k in range(off + 1, off + n))  # the targets inside the segment
    expected = Counter((d, k) for d, n in enumerate(lengths) for k in range(1, n))
    assert not covered - expected  # nothing twice, nothing else
    assert sum((expected - covered).values()) <= T  # only the dropped last row's targets are missing
    in_rows = sum(n - (i == 0 and off > 0) for r in range(g.rows) for i, (_, off, n) in enumerate(g.segments(r)))
    assert g.dropped == sum(lengths) - in_rows
    assert pk.pack_group(lengths, T) == g  # deterministic


def test_rows_are_whole_and_start_on_documents_or_continue_one(corpus):
    path, where, lengths = corpus
    ld = loader(path, order="sequential")
    for row in one_epoch_rows(ld):
        assert len(row) == T + 1
        for a, b in zip(row, row[1:]):
            if b != EOT and where[b][1] > 0:  # inside a document: its next token (documents start at an EOT,
                # or, the split's first, at its first token)
                assert where[b] == ((where[a][0], where[a][1] + 1) if a != EOT else (where[b][0], 1))
        first = row[0]
        assert first == EOT or first in where  # a document's start, or a continuation of one
    ld.close()


@pytest.mark.parametrize("order", ["sequential", "shuffle"])
def test_an_epoch_covers_every_target_once_but_the_dropped_last_rows(corpus, order):
    path, where, lengths = corpus
    ld = loader(path, order=order, seed=3)
    stats = ld.bestfit.stats()
    rows = one_epoch_rows(ld)
    assert len(rows) == stats.rows and not stats.estimated
    # a document's first token (its EOT; the split's first document has none) is no target of its own
    covered = Counter(where[t] for row in rows for t in row[1:] if t != EOT and where[t][1] > 0)
    assert max(covered.values()) == 1  # no target twice
    expected = {(d, k) for d, n in enumerate(lengths) for k in range(1, n)}
    missing = expected - set(covered)
    assert set(covered) <= expected
    # what is missing is only in groups' unfinished last rows: at most T targets per group
    assert len(missing) <= T * ld.bestfit.num_groups
    assert stats.num_tokens - stats.tokens == sum(pk.pack_group(ld.bestfit.lengths[ld.bestfit.group_docs(0, g)].tolist(), T).dropped
                                                  for g in range(ld.bestfit.num_groups))
    assert 0.9 < stats.utilization <= 1
    ld.close()


def test_utilization_of_a_large_split_is_estimated_from_a_sample(corpus, monkeypatch):
    path = corpus[0]
    monkeypatch.setattr(pk, "GROUP_ROWS", 4)  # many small groups
    ld = loader(path)
    exact = ld.bestfit.stats()
    monkeypatch.setattr(pk, "STATS_DOCS", ld.bestfit.D * 5)
    sampled = ld.bestfit.stats()
    assert not exact.estimated and sampled.estimated and sampled.line().startswith("bestfit packing: ~")
    assert sampled.rows == pytest.approx(exact.rows, rel=0.2) and sampled.utilization == pytest.approx(exact.utilization, abs=0.1)
    ld.close()


def test_document_index_and_group_size(corpus):
    path, where, lengths = corpus
    ld = loader(path)
    assert ld.bestfit.num_docs == len(lengths) and ld.bestfit.lengths.tolist() == lengths
    assert ld.bestfit.D == max(1, -(-pk.GROUP_ROWS * T * len(lengths) // sum(lengths)))
    assert pk.document_starts([np.array([EOT, 1, EOT], dtype=np.uint16)], EOT).tolist() == [0, 2]
    assert pk.document_starts([np.array([1, 2], dtype=np.uint16), np.array([EOT], dtype=np.uint16)], EOT).tolist() == [0, 2]
    ld.close()


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("order, prefetch", [("sequential", 0), ("shuffle", 0), ("shuffle", 2)])
def test_a_restored_loader_yields_the_same_next_batches(corpus, order, prefetch, monkeypatch):
    monkeypatch.setattr(pk, "GROUP_ROWS", 8)  # several groups per epoch
    path = corpus[0]
    ld = loader(path, order=order, seed=9, prefetch=prefetch)
    per_epoch = ld.bestfit.stats().rows // B
    states, expected = [], []
    for _ in range(per_epoch + 6):
        states.append(roundtrip(ld.state_dict()))
        expected.append(ld.next_batch())
    assert ld.epoch == 1
    assert all(isinstance(v, (int, str)) for v in states[0].values()) and states[0]["packing"] == "bestfit"
    assert len({s["row"] for s in states}) > 2  # resumed inside groups, not only at their starts
    for cut, prefetch2 in ((1, 0), (2, 2), (3, 0), (per_epoch - 2, 0), (per_epoch - 1, 2)):  # and across the epoch's end
        other = loader(path, order=order, seed=0, prefetch=prefetch2)
        other.next_batch()  # a position to be replaced
        other.load_state_dict(states[cut])
        got = [other.next_batch() for _ in range(6)]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected[cut:]))
        other.close()
    ld.close()


@pytest.mark.parametrize("order", ["sequential", "shuffle"])
def test_two_ranks_read_what_one_process_with_twice_the_batch_reads(corpus, order):
    path = corpus[0]
    single = loader(path, order=order, seed=5, batch_size=2 * B)
    ranks = [loader(path, order=order, seed=5, rank=r, world_size=2, prefetch=r) for r in range(2)]
    for _ in range(3 * single.bestfit.stats().rows // (2 * B) // 2):  # past an epoch boundary
        x, y = single.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert single.epoch >= 1
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    for ld in (single, *ranks):
        ld.close()


def test_windows_is_the_default_and_ignores_documents(corpus):
    path = corpus[0]
    a, b = ShardLoader(path, batch_size=B, seq_len=T, order="sequential"), loader(path, order="sequential", packing="windows")
    assert a.bestfit is None and "packing" not in a.state_dict()
    for _ in range(5):
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch()))
    a.close(), b.close()


def test_errors_for_a_bad_packing_and_a_state_of_the_other_packing(corpus, tmp_path):
    path = corpus[0]
    with pytest.raises(GPTForgeError, match=r"^invalid config: data.packing must be windows or bestfit, got 'best'$"):
        C.resolve(None, [("data.packing", "best")])
    with pytest.raises(GPTForgeError, match=r"packing must be windows or bestfit, got 'best'"):
        ShardLoader(path, batch_size=B, seq_len=T, packing="best")
    windows, bestfit = ShardLoader(path, batch_size=B, seq_len=T), loader(path)
    with pytest.raises(GPTForgeError, match=r"^data loader state: saved with data.packing 'windows', this loader uses "
                                            r"'bestfit'; resume with the same data.packing$"):
        bestfit.load_state_dict(windows.state_dict())
    with pytest.raises(GPTForgeError, match=r"saved with data.packing 'bestfit', this loader uses 'windows'"):
        windows.load_state_dict(bestfit.state_dict())
    bad = dict(bestfit.state_dict(), group=10**6)
    with pytest.raises(GPTForgeError, match=r"out of range"):
        bestfit.load_state_dict(bad)
    windows.close(), bestfit.close()


def test_a_checkpoints_ranks_must_agree_on_the_row_and_another_world_size_continues_silently(corpus):
    """The trainer's check of the loader states saved by every rank: bestfit's position is
    (epoch, group, row); the row stream ignores the batch, so a new world size does not warn."""
    import warnings

    from gptforge.training.distributed import DistEnv, loader_state

    ld = loader(corpus[0])
    ld.next_batch()
    state = ld.state_dict()
    saved_train = {"optim": {"micro_batch_size": 3}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader_state([state, dict(state)], saved_train, DistEnv(world_size=1), ld) == state
    with pytest.raises(GPTForgeError, match=r"ranks saved different data positions"):
        loader_state([state, dict(state, row=state["row"] + 1)], saved_train, DistEnv(), ld)
    ld.close()


def test_a_split_without_a_full_row_is_an_error(tmp_path):
    docs = np.full(150, EOT, dtype=np.uint16)  # documents of one token: no targets, so no rows
    shards.write_dataset(tmp_path / "d", {"train": iter([docs]), "val": iter([docs])}, vocab_size=VOCAB, eot_id=EOT,
                         tokenizer="gpt2")
    ld = ShardLoader(tmp_path / "d", batch_size=1, seq_len=64, packing="bestfit")
    with pytest.raises(GPTForgeError, match=r"no group of documents fills one row of 65 tokens"):
        ld.next_batch()
    ld.close()


def test_train_with_bestfit_resumes_bitwise(tmp_path, shards_dir, capsys):
    """`gptforge train --data.packing bestfit`: the banner reports the packing, and a run stopped
    and resumed takes exactly the losses of an uninterrupted one (shuffle, prefetch 2)."""
    from test_train import run_cli, small_cfg, train

    over = {"data.packing": "bestfit", "data.order": "shuffle", "data.prefetch": 2}
    full = train(small_cfg(tmp_path / "full", shards_dir, **over), progress=False)
    assert "| bestfit packing: " in capsys.readouterr().out
    train(small_cfg(tmp_path / "half", shards_dir, **over, **{"run.max_steps": 3}), progress=False)
    cont = train(small_cfg(tmp_path / "half", shards_dir, **over), resume="auto", progress=False)
    assert sorted(cont.losses) == [3, 4, 5]
    assert [cont.losses[s] for s in (3, 4, 5)] == [full.losses[s] for s in (3, 4, 5)]  # bitwise
    p = run_cli("train", "--model.preset", "nano", "--data.dir", str(shards_dir), "--data.seq_len=32", "--data.packing",
                "bestfit", "--optim.batch_tokens", "128", "--optim.micro_batch_size", "4", "--run.dir", str(tmp_path / "cli"),
                "--run.max_steps", "2", "--run.device", "cpu", "--run.sample_tokens", "0", "--run.eval_tokens", "256",
                "--run.peak_tflops", "1")
    assert p.returncode == 0, p.stderr
    assert "bestfit packing: " in p.stdout and "% of the tokens in rows" in p.stdout


def test_shuffle_hands_out_a_groups_rows_in_a_seeded_order_not_a_documents_stretch(tmp_path):
    """Documents of many rows each: packed in order, a batch is one document's consecutive rows (a
    stretch of one text: far worse training, measured). Shuffled, a batch's rows come from several
    documents, the order depends on the seed, and each row is still handed out once an epoch."""
    docs = 8
    stream = np.concatenate([[EOT] + [1 + d * 1000 + k for k in range(239)] for d in range(docs)]).astype(np.uint16)
    path = tmp_path / "long"
    shards.write_dataset(path, {"train": iter([stream]), "val": iter([stream[:300]])}, vocab_size=VOCAB, eot_id=EOT,
                         tokenizer="gpt2")
    doc_of = lambda row: {(v - 1) // 1000 for v in row if v != EOT}  # noqa: E731
    seq = one_epoch_rows(loader(path, order="sequential"))
    assert all(len(doc_of(r)) == 1 for r in seq[:B]) and len(set.union(*map(doc_of, seq[:B]))) == 1
    a = one_epoch_rows(loader(path, order="shuffle", seed=1))
    assert a == one_epoch_rows(loader(path, order="shuffle", seed=1))
    assert a != one_epoch_rows(loader(path, order="shuffle", seed=2))
    assert len(a) == len(seq)
    for k in range(0, len(a) - B + 1, B):  # every batch mixes documents
        assert len(set.union(*map(doc_of, a[k : k + B]))) >= 2
