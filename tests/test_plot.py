"""`gptforge plot`: metrics reading, legend labels from config differences, the PNG itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gptforge import cli
from gptforge.config import TrainConfig
from gptforge.errors import GPTForgeError
from gptforge.plot import ema, flatten, plot_runs, read_metrics, run_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(d: Path, lr: float, steps: int = 60, batch_tokens: int = 1024, spike_at: int | None = None) -> Path:
    """A run directory as the trainer writes it: config.json and metrics.jsonl with train, eval,
    skipped and event rows."""
    d.mkdir(parents=True)
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.batch_tokens, cfg.run.dir = lr, batch_tokens, str(d)
    (d / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    rows = [{"step": 0, "event": "start"}]
    for s in range(steps):
        loss = 3 + 7 * math.exp(-s * lr * 50) + (4.0 if s == spike_at else 0.0)
        rows.append({"step": s, "tokens": (s + 1) * batch_tokens, "loss": loss, "lr": lr, "grad_norm": 1.0,
                     "dt_ms": 5.0, "tokens_per_s": 2e5, "mfu": 0.01})
        if s == spike_at:
            rows.append({"step": s, "tokens": (s + 1) * batch_tokens, "loss": loss + 5, "skipped": True, "reason": "spike"})
        if (s + 1) % 20 == 0:
            vl = 3.2 + 7 * math.exp(-s * lr * 50)
            rows.append({"step": s + 1, "tokens": (s + 1) * batch_tokens, "val_loss": vl, "val_ppl": math.exp(vl)})
    with open(d / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


def test_labels_from_what_differs(tmp_path):
    a = make_run(tmp_path / "a", lr=6e-4)
    b = make_run(tmp_path / "b", lr=3e-4)
    configs = [json.loads((d / "config.json").read_text()) for d in (a, b)]
    assert run_labels(configs, ["a", "b"]) == ["optim.lr=0.0006", "optim.lr=0.0003"]  # run.dir is ignored


def test_labels_several_keys_missing_keys_and_fallbacks():
    base = {"model": {"preset": "nano"}, "optim": {"lr": 1e-3, "warmup_steps": 10}, "run": {"dir": "x"}}
    other = {"model": {"preset": "tiny"}, "optim": {"lr": 1e-3, "warmup_steps": 20}, "run": {"dir": "y"}}
    assert run_labels([base, other], ["x", "y"]) == [
        "model.preset=nano, optim.warmup_steps=10", "model.preset=tiny, optim.warmup_steps=20"]
    extra = {**other, "data": {"order": "shuffle"}}
    assert run_labels([base, extra], ["x", "y"])[0].endswith("data.order=<missing>")
    many = [{"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2}]
    assert run_labels(many, ["x", "y"]) == ["a=1, b=1, c=1, +2 more", "a=2, b=2, c=2, +2 more"]
    assert run_labels([base, dict(base)], ["x", "y"]) == ["x", "y"]  # nothing differs: names
    assert run_labels([base, None], ["x", "y"]) == ["x", "y"]  # a config is missing: names
    assert run_labels([base], ["only"]) == ["only"]
    assert run_labels([None, None], ["same", "same"]) == ["same [0]", "same [1]"]
    assert flatten({"a": {"b": {"c": 1}}, "d": [1, 2]}) == {"a.b.c": 1, "d": [1, 2]}


def test_labels_name_data_dirs_by_their_last_component():
    a = {"data": {"dir": "/work/bench/data-kjv"}, "model": {"arch": "gpt2", "init_from": ""}}
    b = {"data": {"dir": "/work/bench/data-stdlib/"}, "model": {"arch": "modern", "init_from": "runs/base/"}}
    assert run_labels([a, b], ["x", "y"]) == ['data.dir=data-kjv, model.arch=gpt2, model.init_from=""',
                                              "data.dir=data-stdlib, model.arch=modern, model.init_from=base"]
    same_name = [{"data": {"dir": "/a/data"}}, {"data": {"dir": "/b/data"}}]
    assert run_labels(same_name, ["x", "y"]) == ["x: data.dir=data", "y: data.dir=data"]  # told apart by run


def test_read_metrics_tolerates_other_rows_and_keeps_the_resumed_attempt(tmp_path):
    run = make_run(tmp_path / "run", lr=6e-4, steps=40, spike_at=7)
    with open(run / "metrics.jsonl", "a") as f:
        # resumed from the step-30 checkpoint: steps 30..34 logged again, eval at 40 not yet
        for s in range(30, 35):
            f.write(json.dumps({"step": s, "tokens": (s + 1) * 1024, "loss": 1.0, "lr": 6e-4}) + "\n")
        f.write(json.dumps({"step": 30, "event": "resume"}) + "\n\n")
        f.write('{"step": 35, "tokens": 36864, "lo')  # being written right now
    m = read_metrics(run)
    assert [r["step"] for r in m.train] == list(range(35))
    assert [r["loss"] for r in m.train[30:]] == [1.0] * 5 and m.train[29]["loss"] != 1.0
    assert [r["step"] for r in m.val] == [20, 40]
    assert [r["step"] for r in m.skipped] == [7]
    assert m.config["optim"]["lr"] == 6e-4


def test_read_metrics_errors_name_the_run(tmp_path):
    with pytest.raises(GPTForgeError, match="does not exist"):
        read_metrics(tmp_path / "nope")
    (tmp_path / "nometrics").mkdir()
    with pytest.raises(GPTForgeError, match=r"nometrics: no metrics.jsonl"):
        read_metrics(tmp_path / "nometrics")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(GPTForgeError, match=r"empty: metrics.jsonl has no train or validation loss rows"):
        read_metrics(empty)
    (empty / "metrics.jsonl").write_text('{"step": 0, "event": "start"}\n')
    with pytest.raises(GPTForgeError, match="no train or validation loss rows"):
        read_metrics(empty)
    bad = make_run(tmp_path / "bad", lr=1e-3, steps=3)
    text = (bad / "metrics.jsonl").read_text().splitlines()
    (bad / "metrics.jsonl").write_text("\n".join(text[:2] + ["{oops"] + text[2:]) + "\n")
    with pytest.raises(GPTForgeError, match=r"metrics.jsonl:3: not valid JSON"):
        read_metrics(bad)


def test_ema_starts_at_the_first_value_and_skips_gaps():
    assert ema([1.0, 3.0], 0.5) == [1.0, 2.0]
    out = ema([2.0, float("nan"), 4.0], 0.5)
    assert out[0] == 2.0 and math.isnan(out[1]) and out[2] == 3.0
    assert ema([5.0, 7.0], 0.0) == [5.0, 7.0]


@pytest.mark.parametrize("x", ["both", "step", "tokens"])
def test_plot_writes_a_png(tmp_path, x):
    a = make_run(tmp_path / "lr6e-4", lr=6e-4, spike_at=30)
    b = make_run(tmp_path / "lr3e-4", lr=3e-4, batch_tokens=2048)
    with open(b / "metrics.jsonl", "a") as f:  # a null (non-finite) loss and a HellaSwag row
        f.write(json.dumps({"step": 60, "tokens": 61 * 2048, "loss": None, "lr": 3e-4}) + "\n")
        f.write(json.dumps({"step": 60, "tokens": 61 * 2048, "hellaswag_acc": 0.26, "hellaswag_acc_norm": 0.27}) + "\n")
    out = plot_runs([a, b], tmp_path / "plots" / "cmp.png", smooth=0.9, log_scale=x == "step", x=x)
    assert out == tmp_path / "plots" / "cmp.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["cmp.png"]  # no temporary left behind


def test_plot_errors(tmp_path):
    a = make_run(tmp_path / "a", lr=1e-3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    with pytest.raises(GPTForgeError, match="empty"):
        plot_runs([a, tmp_path / "empty"], tmp_path / "out.png")
    with pytest.raises(GPTForgeError, match="smooth"):
        plot_runs([a], tmp_path / "out.png", smooth=1.0)
    with pytest.raises(GPTForgeError, match="x must be"):
        plot_runs([a], tmp_path / "out.png", x="time")
    with pytest.raises(GPTForgeError, match="at least one run"):
        plot_runs([], tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_plot_command(tmp_path, capsys):
    a = make_run(tmp_path / "a", lr=6e-4)
    b = make_run(tmp_path / "b", lr=3e-4)
    out = tmp_path / "cmp.png"
    assert cli.main(["plot", str(a), str(b), "--out", str(out), "--smooth", "0.8", "--log", "--x", "tokens"]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert f"wrote {out}" in capsys.readouterr().out
    assert cli.main(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "missing" in capsys.readouterr().err


def test_runs_with_different_tokenizers_are_compared_in_bits_per_byte(tmp_path):
    from gptforge.plot import choose_panels

    dirs = []
    for name, tok in (("a", "gpt2"), ("b", "bpe4096-0123456789ab")):
        d = make_run(tmp_path / name, lr=6e-4, steps=40)
        cfg = json.loads((d / "config.json").read_text())
        cfg["resolved"] = {"tokenizer": {"name": tok, "vocab_size": 50257 if tok == "gpt2" else 4096}}
        (d / "config.json").write_text(json.dumps(cfg))
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for r in rows:
            if "val_loss" in r:
                r["val_bpb"] = r["val_loss"] / 2
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(d)
    panels, note = choose_panels([read_metrics(d) for d in dirs])
    assert [p[1] for p in panels] == ["loss", "val_bpb"]
    assert "different tokenizers (bpe4096-0123456789ab, gpt2)" in note and "bits per UTF-8 byte" in note
    panels, note = choose_panels([read_metrics(dirs[0])])  # one tokenizer: nats, and bpb beside them
    assert [p[1] for p in panels] == ["loss", "val_loss", "val_ppl", "val_bpb"] and note == ""
    old = make_run(tmp_path / "old", lr=3e-4, steps=40)  # before tokenizers were recorded: gpt2
    assert choose_panels([read_metrics(dirs[0]), read_metrics(old)])[1] == ""
    out = plot_runs(dirs, tmp_path / "mixed.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
