"""Perplexity, HellaSwag (completion style) and the `gptforge eval` command, on the nano preset."""

from __future__ import annotations

import io
import json
import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptforge import cli
from gptforge.checkpoint import save_model
from gptforge.commands import evaluate as eval_cmd
from gptforge.device import Runtime
from gptforge.errors import GPTForgeError
from gptforge.eval import hellaswag as hs
from gptforge.eval.perplexity import evaluate_loss
from gptforge.model import GPT, preset
from gptforge.tokenizer import Tokenizer

CPU = Runtime(torch.device("cpu"), "fp32")


def nano(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("nano", **overrides))


class FakeLoader:
    """ShardLoader's evaluation interface over a token array: non-overlapping windows of T+1
    tokens, dealt round-robin to ranks, batched B at a time (a short last batch is dropped)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        self.B, self.T = self.batch_size, self.seq_len = batch_size, seq_len  # ShardLoader's names: B, T
        n = (len(tokens) - 1) // seq_len
        self.windows = [tokens[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)][rank::world_size]
        self.num_windows = len(self.windows)
        self.num_tokens = len(tokens)
        self.max_batches_asked = "not called"

    def iter_epoch(self, max_batches=None):
        self.max_batches_asked = max_batches
        n_batches = len(self.windows) // self.batch_size
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            w = torch.stack(self.windows[b * self.batch_size : (b + 1) * self.batch_size])  # (B, T+1)
            yield w[:, :-1].clone(), w[:, 1:].clone()


def random_tokens(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g, dtype=torch.long)


# ---------------------------------------------------------------------------- perplexity


def test_perplexity_is_exp_of_mean_loss_over_the_same_windows():
    model = nano(vocab_size=512)
    loader = FakeLoader(random_tokens(4 * 3 * 32 + 1, 512), batch_size=3, seq_len=32)
    res = evaluate_loss(model, loader, CPU)

    losses = []
    with torch.no_grad():
        for x, y in loader.iter_epoch():
            _, loss = model(x, y)  # the model's own mean loss; batches have equal sizes
            losses.append(loss.item())
    mean = sum(losses) / len(losses)
    assert res["tokens"] == 4 * 3 * 32
    assert res["loss"] == pytest.approx(mean, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(mean), rel=1e-6)


def test_perplexity_max_tokens_is_exact_and_reads_no_more_batches():
    model = nano(vocab_size=512)
    loader = FakeLoader(random_tokens(6 * 2 * 16 + 1, 512, seed=2), batch_size=2, seq_len=16)
    budget = 2 * 16 + 20  # one batch and a bit
    res = evaluate_loss(model, loader, CPU, max_tokens=budget)
    assert loader.max_batches_asked == 2
    assert res["tokens"] == budget

    xs, ys = zip(*loader.iter_epoch(max_batches=2))
    x, y = torch.cat(xs), torch.cat(ys)  # (4, 16): windows in reading order
    with torch.no_grad():
        logits, _ = model(x)
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    assert res["loss"] == pytest.approx(per_token[:budget].mean().item(), rel=1e-6)


def test_eval_tokens_bound_the_batches_a_shard_loader_reads(tmp_path, capsys):
    """The budget through the real ShardLoader (its batch and length are B and T): the loader is
    told to read only the batches the budget needs, and the progress bar counts to that total."""
    from gptforge.data.loader import ShardLoader
    from test_data_loader import make_dir

    data = make_dir(tmp_path / "data", val_sizes=(4000,))
    loader = ShardLoader(data, split="val", batch_size=2, seq_len=16, order="sequential", seed=0, prefetch=0)
    assert loader.steps_per_epoch > 10  # the split holds far more than the budget
    asked, read = [], []
    whole_split = loader.iter_epoch

    def iter_epoch(max_batches=None):
        asked.append(max_batches)
        for batch in whole_split(max_batches):
            read.append(batch)
            yield batch

    loader.iter_epoch = iter_epoch
    budget = 2 * (2 * 16) + 5  # two batches and 5 tokens of a third
    res = evaluate_loss(nano(), loader, CPU, max_tokens=budget, progress=True)
    assert res["tokens"] == budget
    assert asked == [3] and len(read) == 3  # no more than the budget's 3 batches may be read
    assert "0/3" in capsys.readouterr().err  # the bar knows its total
    loader.close()


def test_perplexity_skips_ignored_targets():
    model = nano(vocab_size=256)
    loader = FakeLoader(random_tokens(2 * 2 * 16 + 1, 256, seed=8), batch_size=2, seq_len=16)
    batches = [(x, y.clone()) for x, y in loader.iter_epoch()]
    for _, y in batches:
        y[:, ::3] = -1  # the model's ignore index
    masked = type("L", (), {"iter_epoch": lambda self, max_batches=None: iter(batches)})()
    res = evaluate_loss(model, masked, CPU)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        _, loss = model(x, y)  # the model's own mean over non-ignored targets
    assert res["tokens"] == int((y != -1).sum())
    assert res["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_perplexity_eval_mode_restored_and_deterministic_with_dropout():
    model = nano(vocab_size=256, dropout=0.5)
    loader = FakeLoader(random_tokens(2 * 2 * 16 + 1, 256, seed=3), batch_size=2, seq_len=16)
    model.train()
    a = evaluate_loss(model, loader, CPU)
    assert model.training  # given back as it came
    b = evaluate_loss(model, loader, CPU, progress=True)
    assert a["loss"] == b["loss"]  # dropout was off: eval mode inside
    model.eval()
    evaluate_loss(model, loader, CPU)
    assert not model.training


def test_perplexity_under_bf16_autocast_is_close():
    model = nano(vocab_size=256)
    loader = FakeLoader(random_tokens(2 * 2 * 16 + 1, 256, seed=4), batch_size=2, seq_len=16)
    ref = evaluate_loss(model, loader, CPU)
    bf16 = evaluate_loss(model, loader, Runtime(torch.device("cpu"), "bf16"))
    assert bf16["loss"] == pytest.approx(ref["loss"], rel=2e-2)


def test_perplexity_of_empty_split_is_an_error():
    model = nano(vocab_size=256)
    with pytest.raises(GPTForgeError, match="no tokens"):
        evaluate_loss(model, FakeLoader(random_tokens(10, 256), batch_size=2, seq_len=16), CPU)


# ---------------------------------------------------------------------------- HellaSwag


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    """Examples in the official format, with the fields the official file carries."""
    with open(path, "w") as f:
        for i, ex in enumerate(examples):
            row = {"ind": i, "activity_label": "Testing", "ctx_a": ex["ctx"], "ctx_b": "", "ctx": ex["ctx"],
                   "split": "val", "split_type": "indomain", "label": ex["label"], "endings": ex["endings"],
                   "source_id": f"test~{i}"}
            f.write(json.dumps(row) + "\n")
    return path


THE = 262  # " the"


def the_lover() -> GPT:
    """A nano GPT that predicts " the" with logit 10 and every other token with logit 0, whatever
    the context: every weight zero, the final LayerNorm outputs its bias e_0 * 10, and the tied
    embedding has a 1 in column 0 of the row of " the" only."""
    model = nano()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.wte.weight[THE, 0] = 1.0
        model.transformer.ln_f.bias[0] = 10.0
    return model


# token losses of that model: " the" vs any other token
V = 50257
LOSS_THE = math.log(1 + (V - 1) * math.exp(-10))
LOSS_OTHER = 10 + LOSS_THE

ENDINGS = ["the dog", "the the the dog", "cat sat on the mat", "big red dog"]  # (n_the, n_other): (1,1) (3,1) (1,4) (0,3)


def test_hellaswag_scoring_on_a_model_with_a_known_preference():
    model = the_lover()
    tok = Tokenizer()
    ex = hs.Example("A man is sitting on a roof. he", ENDINGS, 0)
    tokens, mask = hs.render_example(ex, tok, model.config.block_size)
    sum_loss, mean_loss = hs.score_endings(model, tokens, mask, CPU)
    expected = [(1, 1), (3, 1), (1, 4), (0, 3)]
    for i, (n_the, n_other) in enumerate(expected):
        total = n_the * LOSS_THE + n_other * LOSS_OTHER
        assert sum_loss[i].item() == pytest.approx(total, rel=1e-4)
        assert mean_loss[i].item() == pytest.approx(total / (n_the + n_other), rel=1e-4)
    # lowest sum: "the dog" (12.4); lowest mean: "the the the dog" (3.7 per token)


def test_hellaswag_acc_by_sum_and_acc_norm_by_mean(tmp_path):
    model = the_lover()
    # ex0: "the the the" wins both ways; ex1: label 0 right by sum only; ex2: label 1 right by mean only
    path = write_jsonl(tmp_path / "hs.jsonl", [
        {"ctx": "Some context.", "endings": ["cat sat down", "the the the", "a dog ran", "big red dog"], "label": 1},
        {"ctx": "A man is sitting on a roof. he", "endings": ENDINGS, "label": 0},
        {"ctx": "A woman walks in. she", "endings": ENDINGS, "label": 1},
    ])
    model.train()
    res = hs.evaluate_hellaswag(model, path, CPU, progress=True)
    assert model.training
    assert res == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3}
    assert hs.evaluate_hellaswag(model, path, CPU, max_examples=2) == {"acc": 1.0, "acc_norm": 0.5, "n": 2}


def reference_losses(model: GPT, ctx_ids: list[int], ending: str) -> tuple[float, float]:
    """One ending, no batching and no padding: sum and mean loss of its tokens given the context
    (cropped from the left to block_size)."""
    end_ids = Tokenizer().encode(" " + ending)
    ids = (ctx_ids + end_ids)[-model.config.block_size :]
    n_scored = min(len(end_ids), len(ids) - 1)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)  # position t predicts ids[t+1]
    targets = torch.tensor(ids[1:])
    token_losses = -logp[torch.arange(len(ids) - 1), targets][-n_scored:]
    return token_losses.sum().item(), token_losses.mean().item()


def test_hellaswag_batched_scoring_matches_one_ending_at_a_time(tmp_path):
    model = nano(seed=5)
    long_ctx = " ".join(f"word{i}" for i in range(60))  # well over block_size 64 tokens: cropped
    examples = [
        {"ctx": "The cat", "endings": ["sat.", "sat on the mat and purred loudly.", "ran", "is here now"], "label": 2},
        {"ctx": long_ctx, "endings": ["ends here.", "and then a much longer ending follows it", "x", "y z"], "label": 0},
        {"ctx": "", "endings": ["an empty context", "still works"], "label": 1},
    ]
    path = write_jsonl(tmp_path / "hs.jsonl", examples)
    tok = Tokenizer()
    acc = acc_norm = 0
    for ex in examples:
        ctx_ids = tok.encode(ex["ctx"]) or [tok.eot_id]  # an empty context starts from <|endoftext|>
        ref = [reference_losses(model, ctx_ids, e) for e in ex["endings"]]
        tokens, mask = hs.render_example(hs.Example(ex["ctx"], ex["endings"], ex["label"]), tok, 64)
        assert tokens.shape[1] <= 64
        sum_loss, mean_loss = hs.score_endings(model, tokens, mask, CPU)
        assert sum_loss.tolist() == pytest.approx([r[0] for r in ref], rel=1e-4)
        assert mean_loss.tolist() == pytest.approx([r[1] for r in ref], rel=1e-4)
        acc += min(range(len(ref)), key=lambda i: ref[i][0]) == ex["label"]
        acc_norm += min(range(len(ref)), key=lambda i: ref[i][1]) == ex["label"]
    res = hs.evaluate_hellaswag(model, path, CPU)
    assert res == {"acc": pytest.approx(acc / 3), "acc_norm": pytest.approx(acc_norm / 3), "n": 3}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"ctx": "a", "label": 0}', "missing field"),
        ('{"ctx": "a", "endings": ["x", "y"]}', "unlabeled"),
        ('{"ctx": "a", "endings": ["x", "y"], "label": 2}', "label must be an index"),
        ('{"ctx": "a", "endings": "xy", "label": 0}', "endings must be a list"),
        ('{"ctx": 3, "endings": ["x", "y"], "label": 0}', "ctx must be a string"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_hellaswag_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"ctx": "c", "endings": ["a", "b", "c", "d"], "label": "3"})  # "3": tolerated
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(GPTForgeError, match=message) as e:
        hs.load_examples(path)
    assert f"{path}:3" in str(e.value)
    assert len(hs.load_examples(path, max_examples=1)) == 1  # the bad line is never reached


def test_hellaswag_missing_or_empty_file(tmp_path):
    with pytest.raises(GPTForgeError, match="not found"):
        hs.load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GPTForgeError, match="no HellaSwag examples"):
        hs.load_examples(tmp_path / "empty.jsonl")


def test_hellaswag_download_offline_says_to_pass_a_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hs.urllib.request, "urlopen", offline)
    with pytest.raises(GPTForgeError, match="no network: pass the path of hellaswag_val.jsonl"):
        hs.download_hellaswag(tmp_path / "cache")
    assert not (tmp_path / "cache" / hs.FILENAME).exists()


def test_hellaswag_download_uses_cache_and_rejects_non_jsonl(tmp_path, monkeypatch):
    body = json.dumps({"ctx": "c", "endings": ["a", "b"], "label": 0}).encode() + b"\n"
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(hs.urllib.request, "urlopen", fake_urlopen)
    path = hs.download_hellaswag(tmp_path / "cache")
    assert path == tmp_path / "cache" / hs.FILENAME and path.read_bytes() == body
    assert hs.download_hellaswag(tmp_path / "cache") == path and calls == [hs.URL]  # cached: no second download

    body = b"<html>captive portal</html>\n"
    with pytest.raises(GPTForgeError, match="did not return HellaSwag jsonl"):
        hs.download_hellaswag(tmp_path / "other")
    assert not (tmp_path / "other" / hs.FILENAME).exists()


def test_hellaswag_reference_figures():
    assert hs.REFERENCE["gpt2 124M"]["acc_norm"] == 0.2955
    assert "0.2955" in hs.format_reference()


# ---------------------------------------------------------------------------- distributed


def _dist_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        model = nano(vocab_size=50257)
        loader = FakeLoader(random_tokens(5 * 16 + 1, 50257, seed=6), 2, 16, rank=rank, world_size=world)
        val = evaluate_loss(model, loader, CPU)
        val_capped = evaluate_loss(model, loader, CPU, max_tokens=2 * 16)
        res = hs.evaluate_hellaswag(model, f"{tmp}/hs.jsonl", CPU)
        Path(f"{tmp}/rank{rank}.json").write_text(json.dumps([val, val_capped, res]))
    finally:
        dist.destroy_process_group()


def test_distributed_sums_over_ranks(tmp_path):
    examples = [{"ctx": f"Example {i} is", "endings": ["good", "bad", "fine", "odd"], "label": i % 4} for i in range(5)]
    write_jsonl(tmp_path / "hs.jsonl", examples)
    torch.multiprocessing.spawn(_dist_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    model = nano(vocab_size=50257)
    tokens = random_tokens(5 * 16 + 1, 50257, seed=6)
    # 5 windows, two ranks, batch 2: rank 0 scores windows 0 and 2 (4 is a short batch), rank 1 windows 1 and 3
    shared = FakeLoader(tokens, 1, 16)
    shared.windows = shared.windows[:4]
    single = evaluate_loss(model, shared, CPU)
    single_hs = hs.evaluate_hellaswag(model, tmp_path / "hs.jsonl", CPU)
    for rank in range(2):
        val, val_capped, res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert val["tokens"] == single["tokens"] == 4 * 16
        assert val["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert val_capped["tokens"] == 2 * 16  # the cap is over all ranks together: 16 tokens each
        assert res == {"acc": pytest.approx(single_hs["acc"]), "acc_norm": pytest.approx(single_hs["acc_norm"]), "n": 5}


# ---------------------------------------------------------------------------- gptforge eval


def test_resolve_checkpoint_picks_newest_complete_step(tmp_path):
    model = nano(vocab_size=128)
    run = tmp_path / "run"
    for step in (10, 20):
        save_model(model, run / "checkpoints" / f"step_{step:06d}")
    incomplete = run / "checkpoints" / "step_000030"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    assert eval_cmd.resolve_checkpoint(run) == run / "checkpoints" / "step_000020"
    assert eval_cmd.resolve_checkpoint(run / "checkpoints" / "step_000010") == run / "checkpoints" / "step_000010"
    with pytest.raises(GPTForgeError, match="complete checkpoints/step_"):
        eval_cmd.resolve_checkpoint(tmp_path)
    with pytest.raises(GPTForgeError, match="no such checkpoint"):
        eval_cmd.resolve_checkpoint(tmp_path / "missing")


def test_eval_command_hellaswag_prints_the_reference(tmp_path, capsys):
    save_model(the_lover(), tmp_path / "run" / "checkpoints" / "step_000005")
    path = write_jsonl(tmp_path / "hs.jsonl", [{"ctx": "A man is sitting on a roof. he", "endings": ENDINGS, "label": 0}])
    rc = cli.main(["eval", str(tmp_path / "run"), "--hellaswag", str(path), "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "step_000005" in out
    assert "hellaswag acc 1.0000  acc_norm 0.0000  on 1 examples" in out
    assert "gpt2 124M acc 0.2859 acc_norm 0.2955" in out


def test_eval_command_needs_data_or_hellaswag(tmp_path, capsys):
    save_model(nano(vocab_size=128), tmp_path / "ckpt")
    assert cli.main(["eval", str(tmp_path / "ckpt")]) == 1
    assert "pass --data DIR" in capsys.readouterr().err


def test_eval_command_hellaswag_offline_without_path(tmp_path, capsys, monkeypatch):
    save_model(nano(), tmp_path / "ckpt")
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(hs.urllib.request, "urlopen", offline)
    assert cli.main(["eval", str(tmp_path / "ckpt"), "--hellaswag", "--device", "cpu"]) == 1
    assert "no network: pass the path of hellaswag_val.jsonl" in capsys.readouterr().err


def test_eval_command_loss_over_data(tmp_path, monkeypatch, capsys):
    model = nano(vocab_size=128)
    save_model(model, tmp_path / "ckpt")
    made = {}

    def fake_make_loader(data_dir, split, batch_size, seq_len, device, vocab_size, rank=0, world_size=1):
        made.update(data_dir=data_dir, split=split, batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size)
        return FakeLoader(random_tokens(4 * 2 * 32 + 1, 128, seed=7), batch_size, seq_len)

    monkeypatch.setattr(eval_cmd, "make_loader", fake_make_loader)
    monkeypatch.setattr(eval_cmd, "data_tokenizer", lambda data_dir: None)  # no real data dir: no bits per byte
    result = eval_cmd.evaluate(tmp_path / "ckpt", data="shards", batch_size=2, seq_len=32, device="cpu",
                               precision="fp32", progress=False, report=lambda s: None)
    assert made == dict(data_dir="shards", split="val", batch_size=2, seq_len=32, vocab_size=128)
    expected = evaluate_loss(model, FakeLoader(random_tokens(4 * 2 * 32 + 1, 128, seed=7), 2, 32), CPU)
    assert result["val"]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert result["hellaswag"] is None

    rc = cli.main(["eval", str(tmp_path / "ckpt"), "--data", "shards", "--split", "test", "--max-tokens", "100",
                   "--batch-size", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0 and made["split"] == "test" and made["seq_len"] == 64
    assert "test loss" in capsys.readouterr().out
    assert cli.main(["eval", str(tmp_path / "ckpt"), "--data", "shards", "--seq-len", "65"]) == 1


def test_perplexity_with_the_real_shard_loader(request):
    pytest.importorskip("gptforge.data.loader")
    pytest.importorskip("gptforge.data.prepare")
    from gptforge.data.loader import ShardLoader

    shards = request.getfixturevalue("shards_dir")
    model = nano()
    loader = ShardLoader(shards, split="val", batch_size=2, seq_len=32, order="sequential", seed=0, device="cpu",
                         prefetch=0, vocab_size=model.config.vocab_size)
    res = evaluate_loss(model, loader, CPU)
    sums, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader.iter_epoch():
            _, loss = model(x, y)
            sums += loss.item() * y.numel()
            count += y.numel()
    assert res["tokens"] == count > 0
    assert res["loss"] == pytest.approx(sums / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(sums / count), rel=1e-5)
