"""ShardLoader: windows stitched across shards, shuffle coverage, ranks, exact resume, prefetch, errors."""

from __future__ import annotations

import io
import json

import numpy as np
import psutil
import pytest
import torch

from gptforge.data import loader as loader_mod
from gptforge.data import shards
from gptforge.data.loader import ORDERS, Permutation, ShardLoader
from gptforge.errors import GPTForgeError

VOCAB, EOT = 50257, 50256
SIZES = [1000, 37, 2500, 999, 1]  # odd sizes: windows cross every boundary, one shard shorter than a window
MOD = 50000  # token at global position p is p % MOD: every batch can be checked exactly


def make_dir(path, sizes=SIZES, val_sizes=(300,), vocab=VOCAB):
    def arrays(sizes, offset):
        for n in sizes:
            yield (np.arange(offset, offset + n) % MOD).astype(np.uint16)
            offset += n

    shards.write_dataset(path, {"train": arrays(sizes, 0), "val": arrays(val_sizes, 0)}, vocab_size=vocab, eot_id=EOT, tokenizer="gpt2")
    return path


@pytest.fixture
def data(tmp_path):
    return make_dir(tmp_path / "data")


def starts_of(x: torch.Tensor) -> list[int]:
    """The global start of each row (tokens are positions mod MOD; positions here are < MOD)."""
    return x[:, 0].tolist()


def check_rows(x, y, T):
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        s = row_x[0]
        assert row_x == [(s + j) % MOD for j in range(T)]
        assert row_y == [(s + 1 + j) % MOD for j in range(T)]


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_sizes_and_attributes(data):
    ld = ShardLoader(data, batch_size=4, seq_len=16)
    total = sum(SIZES)
    assert ld.num_tokens == total and ld.num_windows == (total - 1) // 16
    assert (ld.vocab_size, ld.eot_id, ld.tokenizer_name) == (VOCAB, EOT, "gpt2")
    x, y = ld.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous() and x.device.type == "cpu"


@pytest.mark.parametrize("order", ["sequential", "shuffle"])
def test_every_window_is_exact_even_across_shard_boundaries(data, order):
    T = 48  # 1000 = 20.8 * 48: windows straddle 1000, 1037, 3537 and 4536
    ld = ShardLoader(data, batch_size=3, seq_len=T, order=order, seed=7)
    seen = []
    for _ in range(ld.steps_per_epoch):
        x, y = ld.next_batch()
        check_rows(x, y, T)
        seen += starts_of(x)
    crossing = [s for s in seen if any(s < b < s + T + 1 for b in np.cumsum(SIZES)[:-1])]
    assert len(crossing) >= 3
    if order == "sequential":
        assert seen == [i * T for i in range(len(seen))]


def test_shuffle_covers_every_window_exactly_once_per_epoch(data):
    T, B = 16, 4
    ld = ShardLoader(data, batch_size=B, seq_len=T, order="shuffle", seed=3)
    n = ld.num_windows
    assert n % B != 0  # the epoch ends with a partial batch that must be left for the next epoch
    epochs = []
    for _ in range(3):
        seen = []
        for _ in range(ld.steps_per_epoch):
            seen += [s // T for s in starts_of(ld.next_batch()[0])]
        epochs.append(seen)
        assert len(set(seen)) == len(seen) == ld.steps_per_epoch * B  # no window twice in an epoch
        assert set(seen) <= set(range(n))
    assert ld.epoch == 2
    # each epoch is the first steps*B positions of a permutation seeded by (seed, epoch)
    for e, seen in enumerate(epochs):
        assert seen == Permutation(n, 3, e)(np.arange(len(seen))).tolist()
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(len(epochs[0])))
    # with a batch that divides the windows, literally every window each epoch
    ld2 = ShardLoader(data, batch_size=12, seq_len=18, order="shuffle", seed=3)
    assert ld2.num_windows == 252 == 21 * 12
    for _ in range(2):
        seen = [s // 18 for _ in range(21) for s in starts_of(ld2.next_batch()[0])]
        assert sorted(seen) == list(range(252))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4097, 70_000])
def test_permutation_is_a_bijection(n):
    v = Permutation(n, seed=11, epoch=0)(np.arange(n))
    assert np.array_equal(np.sort(v), np.arange(n))
    if n >= 1000:
        assert not np.array_equal(v, np.arange(n))
        assert not np.array_equal(v, Permutation(n, seed=11, epoch=1)(np.arange(n)))
        assert not np.array_equal(v, Permutation(n, seed=12, epoch=0)(np.arange(n)))


@pytest.mark.parametrize("order", ["sequential", "shuffle"])
def test_ranks_are_disjoint_and_together_read_what_one_process_reads(data, order):
    T, B, W = 16, 2, 3
    ranks = [ShardLoader(data, batch_size=B, seq_len=T, order=order, seed=5, rank=r, world_size=W) for r in range(W)]
    single = ShardLoader(data, batch_size=B * W, seq_len=T, order=order, seed=5)
    for _ in range(single.steps_per_epoch + 3):  # into the second epoch
        parts = [ld.next_batch() for ld in ranks]
        x, y = single.next_batch()
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        starts = [set(starts_of(p[0])) for p in parts]
        assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])
    assert {json.dumps(ld.state_dict(), sort_keys=True) for ld in ranks} == {json.dumps(single.state_dict(), sort_keys=True)}


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("order, prefetch", [("sequential", 0), ("shuffle", 0), ("shuffle", 3)])
def test_a_restored_loader_yields_the_same_next_batches(data, order, prefetch):
    T, B = 16, 8
    ld = ShardLoader(data, batch_size=B, seq_len=T, order=order, seed=9, prefetch=prefetch)
    steps = ld.steps_per_epoch
    batches(ld, steps - 2)  # resume right before an epoch boundary
    state = roundtrip(ld.state_dict())
    assert all(isinstance(v, (int, str)) for v in state.values())
    expected = batches(ld, 6)
    assert ld.epoch == 1
    for prefetch2 in (0, 2):
        other = ShardLoader(data, batch_size=B, seq_len=T, order=order, seed=0, prefetch=prefetch2)
        batches(other, 3)  # a position to be replaced
        other.load_state_dict(state)
        got = batches(other, 6)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
        other.close()
    ld.close()


def test_prefetch_yields_what_no_prefetch_yields_and_state_counts_handed_out_batches(data):
    plain = ShardLoader(data, batch_size=4, seq_len=16, order="shuffle", seed=1)
    ahead = ShardLoader(data, batch_size=4, seq_len=16, order="shuffle", seed=1, prefetch=4)
    for _ in range(5):
        a, b = plain.next_batch(), ahead.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert ahead.state_dict() == plain.state_dict()
    ahead.close()


def test_iter_epoch_is_sequential_from_the_start_and_keeps_the_training_position(data):
    T, B = 16, 4
    ld = ShardLoader(data, batch_size=B, seq_len=T, order="shuffle", seed=2, prefetch=2)
    twin = ShardLoader(data, batch_size=B, seq_len=T, order="shuffle", seed=2)
    batches(ld, 3)
    batches(twin, 3)
    state = ld.state_dict()
    evals = list(ld.iter_epoch())
    assert len(evals) == ld.steps_per_epoch
    assert [s for x, _ in evals for s in starts_of(x)] == [i * T for i in range(ld.steps_per_epoch * B)]
    assert len(list(ld.iter_epoch(max_batches=2))) == 2
    assert ld.state_dict() == state
    assert torch.equal(ld.next_batch()[0], twin.next_batch()[0])
    # ranks split each evaluation batch
    r1 = ShardLoader(data, batch_size=2, seq_len=T, rank=1, world_size=2)
    assert [s for x, _ in r1.iter_epoch(max_batches=2) for s in starts_of(x)] == [2 * T, 3 * T, 6 * T, 7 * T]
    ld.close()


def test_resident_memory_does_not_grow_with_the_data(tmp_path):
    n = 48_000_000  # 96 MB of tokens in 3 shards, read whole: memory-map slices would keep ~96 MB resident
    rng = np.random.default_rng(0)
    shards.write_dataset(tmp_path / "big", {"train": (rng.integers(0, 50000, n // 3, dtype=np.uint16) for _ in range(3))},
                         vocab_size=VOCAB, eot_id=EOT, tokenizer="gpt2")
    proc = psutil.Process()
    for order in ("sequential", "shuffle"):
        ld = ShardLoader(tmp_path / "big", batch_size=16, seq_len=1024, order=order)
        batches(ld, 10)
        base = peak = proc.memory_info().rss
        for i in range(ld.steps_per_epoch if order == "sequential" else 1500):
            ld.next_batch()
            if i % 64 == 0:
                peak = max(peak, proc.memory_info().rss)
        assert peak - base < 20e6, (order, (peak - base) / 1e6)
        ld.close()


def test_reading_through_memory_maps_where_pread_is_missing(data, monkeypatch):
    expected = [ShardLoader(data, batch_size=3, seq_len=48, order=o, seed=4).next_batch() for o in ORDERS for _ in range(1)]
    monkeypatch.setattr(loader_mod, "_HAS_PREADV", False)
    got = [ShardLoader(data, batch_size=3, seq_len=48, order=o, seed=4).next_batch() for o in ORDERS for _ in range(1)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    ld = ShardLoader(data, batch_size=3, seq_len=48, order="shuffle", seed=4)
    for _ in range(ld.steps_per_epoch):
        check_rows(*ld.next_batch(), 48)


# --------------------------------------------------------------------------- errors


def test_a_split_shorter_than_one_batch(data):
    with pytest.raises(GPTForgeError, match=r"split 'val' has 300 tokens, fewer than one batch needs \(1 ranks x 2 x 150 \+ 1 = 301\)"):
        ShardLoader(data, split="val", batch_size=2, seq_len=150)
    ShardLoader(data, split="val", batch_size=2, seq_len=149)  # 2 * 149 + 1 = 299 tokens: fits
    with pytest.raises(GPTForgeError, match=r"\(2 ranks x 2 x 100 \+ 1 = 401\)"):
        ShardLoader(data, split="val", batch_size=2, seq_len=100, world_size=2)
    with pytest.raises(GPTForgeError, match=r"no split 'test' in manifest.json \(splits: train, val\)"):
        ShardLoader(data, split="test")


def test_shards_of_another_vocabulary(data, tmp_path):
    with pytest.raises(GPTForgeError, match=r"tokenized with gpt2 \(50257 tokens\), but the model's vocabulary has 1000"):
        ShardLoader(data, batch_size=1, seq_len=8, vocab_size=1000)
    with pytest.raises(GPTForgeError, match="model's vocabulary has 100277"):
        ShardLoader(data, batch_size=1, seq_len=8, vocab_size=100277)
    for ok in (50257, 50304):  # the model's own or a padded vocabulary
        ShardLoader(data, batch_size=1, seq_len=8, vocab_size=ok)
    big = make_dir(tmp_path / "big", sizes=[100], val_sizes=[50], vocab=100277)
    assert np.load(big / "train_000000.npy").dtype == np.uint32
    with pytest.raises(GPTForgeError, match=r"tokenized with gpt2 \(100277 tokens\), but the model's vocabulary has 50257"):
        ShardLoader(big, batch_size=1, seq_len=8, vocab_size=50257)


def test_bad_state_and_arguments(data, tmp_path):
    ld = ShardLoader(data, batch_size=2, seq_len=16)
    other = ShardLoader(data, batch_size=2, seq_len=32)
    with pytest.raises(GPTForgeError, match=r"saved for split 'train' of 4,537 tokens with seq_len 32.*resume with the same data and seq_len"):
        ld.load_state_dict(other.state_dict())
    with pytest.raises(GPTForgeError, match="field 'position' missing"):
        ld.load_state_dict({k: v for k, v in ld.state_dict().items() if k != "position"})
    with pytest.raises(GPTForgeError, match="saved with order 'shuffle', this loader uses 'sequential'"):
        ld.load_state_dict(ld.state_dict() | {"order": "shuffle"})
    with pytest.raises(GPTForgeError, match=r"data loader: batch_size must be an integer >= 1, got 0; order must be sequential or shuffle, got 'random'"):
        ShardLoader(data, batch_size=0, order="random")
    with pytest.raises(GPTForgeError, match=r"rank must be in \[0, world_size=2\), got 2"):
        ShardLoader(data, rank=2, world_size=2)
    with pytest.raises(GPTForgeError, match="not a prepared data directory"):
        ShardLoader(tmp_path)
    with pytest.raises(GPTForgeError, match="no such data directory"):
        ShardLoader(tmp_path / "nope")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_pinned_and_equal(data):
    cpu = ShardLoader(data, batch_size=4, seq_len=16, order="shuffle", seed=1)
    gpu = ShardLoader(data, batch_size=4, seq_len=16, order="shuffle", seed=1, device="cuda", prefetch=2)
    for _ in range(5):
        (a, b), (c, d) = cpu.next_batch(), gpu.next_batch()
        assert c.device.type == "cuda" and torch.equal(a, c.cpu()) and torch.equal(b, d.cpu())
    gpu.close()


def test_prefetch_thread_makes_the_loaders_gpu_its_current_device(data, monkeypatch):
    """The current CUDA device is per thread: the prefetch thread sets the loader's GPU before
    it pins or copies anything (else its buffers land on GPU 0, whatever the rank)."""
    import threading

    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append((threading.current_thread().name, torch.device(d))))
    ld = ShardLoader(data, batch_size=4, seq_len=16, device="cuda:1", prefetch=2)
    # no GPU here: the batch stays on the host; only the thread's set-up is under test
    monkeypatch.setattr(ld, "_to_device", lambda x, y: (torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))))
    x, _ = ld.next_batch()
    ld.close()
    assert x.shape == (4, 16)
    assert seen == [("gptforge-prefetch", torch.device("cuda", 1))]
