"""Decisions by measurement (issue 13): precision auto follows the CPU matmul probe, the probe is
cached, MFU means one thing in banner, metrics and bench, short val splits are evaluated, small
corpora train with the defaults, the top-level Python API, one spelling per shared option."""

from __future__ import annotations

import json
import math
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge import config as C
from gptforge.training import plan
from gptforge import device as D
from gptforge import measure as M
from gptforge.errors import GPTForgeError

ROOT = Path(__file__).parent.parent


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """A private cache dir and a probe that returns given rates (TFLOP/s), counting its calls."""
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(M, "cpu_has_fast_bf16", lambda: True)
    calls = []

    def use(rates: dict):
        def measure(precisions=("fp32", "bf16"), **kw):
            calls.append(tuple(precisions))
            return {p: rates[p] for p in precisions}

        monkeypatch.setattr(M, "measure_cpu_matmul_rates", measure)
        return calls

    return use


# --------------------------------------------------------------------------- precision auto
def test_auto_precision_follows_the_probe_both_ways(fake_probe, tmp_path, monkeypatch):
    fake_probe({"fp32": 0.320, "bf16": 0.167})  # the Xeon without AMX: bf16 half as fast
    rt = D.Runtime.make("cpu", "auto")
    assert rt.precision == "fp32"
    assert "fp32 320" in rt.chosen_by and "bf16 167" in rt.chosen_by
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache2"))  # another machine
    fake_probe({"fp32": 0.198, "bf16": 0.418})  # the EPYC: bf16 twice as fast
    rt = D.Runtime.make("cpu", "auto")
    assert rt.precision == "bf16" and "bf16 418" in rt.chosen_by
    assert D.Runtime.make("cpu", "fp32") == D.Runtime(torch.device("cpu"), "fp32")  # given: no probe, no reason


def test_probe_is_cached_per_cpu_torch_and_threads_and_rewritten_when_damaged(fake_probe, monkeypatch):
    calls = fake_probe({"fp32": 0.2, "bf16": 0.4})
    assert M.cpu_matmul_rates() == {"fp32": 0.2, "bf16": 0.4} and len(calls) == 1
    assert M.cpu_matmul_rates() == {"fp32": 0.2, "bf16": 0.4} and len(calls) == 1  # re-used
    path = M.probe_cache_path()
    saved = json.loads(path.read_text())
    assert saved["key"] == M.probe_key() and saved["rates"] == {"fp32": 0.2, "bf16": 0.4}
    assert set(saved["key"]) == {"cpu", "torch", "threads", "probe"}
    assert not [p for p in path.parent.iterdir() if p != path]  # written atomically: no temp file left
    real_key = M.probe_key
    monkeypatch.setattr(M, "probe_key", lambda: {**saved["key"], "threads": saved["key"]["threads"] + 7})
    M.cpu_matmul_rates()
    assert len(calls) == 2  # another thread count is another measurement, in its own file
    monkeypatch.setattr(M, "probe_key", real_key)
    path.write_text("{not json")
    calls = fake_probe({"fp32": 0.3, "bf16": 0.1})
    assert M.cpu_matmul_rates() == {"fp32": 0.3, "bf16": 0.1} and len(calls) == 3  # measured again
    assert json.loads(path.read_text())["rates"] == {"fp32": 0.3, "bf16": 0.1}
    fake_probe({"fp32": 0.1, "bf16": 0.5})  # measured again (bench): each dtype keeps its higher rate
    assert M.cpu_matmul_rates(refresh=True) == {"fp32": 0.3, "bf16": 0.5} == M.cpu_matmul_rates()


def test_cpu_without_bf16_kernels_probes_fp32_only(fake_probe, monkeypatch):
    calls = fake_probe({"fp32": 0.2, "bf16": 9.9})
    monkeypatch.setattr(M, "cpu_has_fast_bf16", lambda: False)
    assert D.resolve_precision("auto", torch.device("cpu")) == "fp32" and calls == [("fp32",)]


def test_real_probe_measures_both_dtypes_at_the_model_sizes():
    rates = M.measure_cpu_matmul_rates(("fp32", "bf16"), shapes=((256, 384, 1536),), budget_s=0.0)
    assert set(rates) == {"fp32", "bf16"} and all(v > 0 for v in rates.values())
    assert (4096, 384, 1536) in M.PROBE_SHAPES and len(M.PROBE_SHAPES) >= 3  # several sizes, the tiny model's


# --------------------------------------------------------------------------- MFU
def _tiny_data(tmp_path) -> Path:
    from gptforge.bench import write_random_shards

    return write_random_shards(tmp_path / "data", 20_000, 2_000)


def _nano_cfg(tmp_path, data: Path, **over) -> C.TrainConfig:
    base = {"model.preset": "nano", "data.dir": str(data), "data.seq_len": "32", "data.prefetch": "0",
            "optim.batch_tokens": "128", "optim.micro_batch_size": "4", "run.dir": str(tmp_path / "run"),
            "run.max_steps": "2", "run.device": "cpu", "run.eval_every": "0", "run.eval_tokens": "256",
            "run.sample_tokens": "4", "run.ckpt_every": "0"}
    base.update(over)
    return C.resolve(None, list(base.items()))


def test_mfu_fields_agree_between_banner_metrics_and_bench(fake_probe, tmp_path, capsys):
    from gptforge.bench import BenchArgs, format_table, run_ladder
    from gptforge.training.trainer import Trainer, train

    fake_probe({"fp32": 0.004, "bf16": 0.002})  # fp32 is this machine's faster dtype
    cfg = _nano_cfg(tmp_path, _tiny_data(tmp_path), **{"run.precision": "bf16"})
    trainer = Trainer(cfg, progress=False)
    banner = trainer.banner()
    trainer.loader.close(), trainer.val_loader.close(), trainer.report.close()
    assert "MFU peak bf16 0.002 TFLOP/s; device best fp32 0.004 TFLOP/s" in banner
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "mfu" in r]
    flops = trainer.flops_per_token
    for r in rows:
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 0.002e12)  # of the precision in use
        assert r["mfu_best"] == pytest.approx(flops * r["tokens_per_s"] / 0.004e12)  # of the device's best
        assert r["mfu_best"] == pytest.approx(r["mfu"] / 2)  # the slower dtype shows as such

    report = run_ladder(BenchArgs(preset="nano", batch=2, seq_len=32, steps=1, warmup=0, device="cpu",
                                  skip=("flash", "pad_vocab", "compile", "fused_adamw")), echo=lambda *a: None)
    assert report["peaks_tflops"] == {"fp32": 0.004, "bf16": 0.002}
    assert report["peak_tflops"] == 0.004
    by = {r["name"]: r for r in report["rungs"]}
    assert by["fp32"]["mfu"] == pytest.approx(by["fp32"]["mfu_best"])
    assert by["bf16"]["mfu_best"] == pytest.approx(by["bf16"]["mfu"] / 2)
    table = format_table(report)
    assert "MFU best" in table and "fp32 0.004, bf16 0.002 TFLOP/s" in table


def test_train_line_names_the_slower_dtype():
    from gptforge.training.metrics import train_line

    row = {"step": 3, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "dt_ms": 10.0, "tokens_per_s": 4e3}
    assert train_line({**row, "mfu": 0.5, "mfu_best": 0.5}).endswith("| mfu 50.0%")
    assert train_line({**row, "mfu": 0.77, "mfu_best": 0.385}).endswith("| mfu 77.0% (38.5% of the best dtype)")


# --------------------------------------------------------------------------- short splits
def _prepared(tmp_path, n_docs: int, words: int, val_tokens) -> Path:
    from gptforge.data.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    vocab = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "(", ")", ":", "\n"]
    for i in range(n_docs):
        (src / f"d{i:03d}.txt").write_text(" ".join(rng.choice(vocab, size=words)))
    out = tmp_path / "data"
    prepare([str(src)], out, val_tokens=val_tokens, workers=1, progress=False)
    return out


def test_short_split_is_evaluated_whole(tmp_path):
    from gptforge.data.loader import ShardLoader
    from gptforge.eval.perplexity import evaluate_loss, token_losses
    from gptforge.model import GPT, preset

    data = _prepared(tmp_path, 20, 200, 300)
    n = json.loads((data / "manifest.json").read_text())["splits"]["val"]["num_tokens"]
    assert 300 <= n < 16 * 64 + 1  # fewer than one batch of 16 x 64
    with pytest.raises(GPTForgeError, match="fewer than one batch"):
        ShardLoader(data, split="val", batch_size=16, seq_len=64)  # training still needs whole batches
    loader = ShardLoader(data, split="val", batch_size=16, seq_len=64, allow_short=True)
    (x, y), = list(loader.iter_epoch())
    assert x.shape == ((n - 1) // 64, 64) and torch.equal(x[:, 1:], y[:, :-1])  # fewer sequences
    torch.manual_seed(0)
    model = GPT(preset("nano"))
    rt = D.Runtime(torch.device("cpu"), "fp32")
    out = evaluate_loss(model, loader, rt)
    assert out["tokens"] == x.numel() and out["loss"] == pytest.approx(token_losses(model, x, y, rt).mean().item())
    # fewer tokens than one window: one shorter window
    tiny = ShardLoader(data, split="val", batch_size=16, seq_len=n, allow_short=True)
    (x, y), = list(tiny.iter_epoch())
    assert x.shape == (1, n - 1)
    two = [ShardLoader(data, split="val", batch_size=16, seq_len=64, allow_short=True, rank=r, world_size=2)
           for r in range(2)]
    shapes = [next(iter(ld.iter_epoch()))[0].shape for ld in two]
    assert shapes[0] == shapes[1] == ((n - 1) // 64 // 2, 64)  # every rank the same number of sequences


def test_trainer_evaluates_a_val_split_shorter_than_one_batch(tmp_path):
    from gptforge.training.trainer import train

    data = _prepared(tmp_path, 40, 300, 200)  # ~200 val tokens; one batch is 8 x 32 + 1 = 257
    cfg = _nano_cfg(tmp_path, data, **{"optim.batch_tokens": "256", "optim.micro_batch_size": "8",
                                       "run.precision": "fp32", "run.peak_tflops": "1"})
    res = train(cfg, progress=False)
    assert res.step == 2 and math.isfinite(res.val_loss)


# --------------------------------------------------------------------------- small corpora
def test_small_corpus_default_val_split():
    from gptforge.data.prepare import default_val_tokens

    batch = TrainConfigDefaults.batch()
    for total in (100_000, 300_000, 500_000):
        n = default_val_tokens(total)
        assert n >= 2 * batch and n <= math.ceil(0.10 * total)  # a couple of default eval batches, <= 10%
    assert default_val_tokens(20_000_000) == 100_000  # large corpora: 0.5%, as before


class TrainConfigDefaults:
    @staticmethod
    def batch() -> int:
        cfg = C.TrainConfig()
        return cfg.optim.micro_batch_size * plan.seq_len_of(cfg) + 1


def _stdlib_corpus(dst: Path, tokens: int) -> int:
    """Copy standard-library modules (as .txt) until about `tokens` tokens; return the count."""
    from gptforge.tokenizer import Tokenizer

    tok, total = Tokenizer(), 0
    dst.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (dst / (path.name + ".txt")).write_text(text)
        total += len(tok.encode(text)) + 1
        if total >= tokens:
            return total
    return total


@pytest.mark.slow
def test_small_corpus_prepares_trains_and_evaluates_with_defaults(tmp_path, monkeypatch, capsys):
    from gptforge import cli

    total = _stdlib_corpus(tmp_path / "texts", 300_000)
    assert 300_000 <= total < 400_000
    data = tmp_path / "data"
    assert cli.main(["prepare", str(tmp_path / "texts"), "--out", str(data), "--quiet"]) == 0
    m = json.loads((data / "manifest.json").read_text())
    assert 2 * TrainConfigDefaults.batch() <= m["splits"]["val"]["num_tokens"] <= 0.11 * total
    run = tmp_path / "run"
    # the defaults, but for where the data is and how many steps (run.max_steps only to stay quick)
    assert cli.main(["train", "--data.dir", str(data), "--run.dir", str(run), "--run.max_steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "final val loss" in out and "--- sample ---" in out
    assert cli.main(["eval", str(run), "--data", str(data), "--max-tokens", "4096", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"val loss \d+\.\d+ nats/token  perplexity [\d.]+  bits per byte \d+\.\d+  "
                    r"\([\d,]+ tokens, [\d,]+ bytes\)", line), line


# --------------------------------------------------------------------------- the Python API
def test_top_level_api_names_are_lazy_and_callable():
    import subprocess
    import sys

    code = ("import sys, gptforge; assert 'torch' not in sys.modules, 'torch imported by import gptforge'; "
            "from gptforge.training.trainer import TrainResult; import gptforge.sampling; "
            "from gptforge import GPT, GPTConfig, Tokenizer, TrainConfig, train, generate, load, prepare; "
            "import types; assert not any(isinstance(f, types.ModuleType) for f in (train, generate)); "
            "assert all(callable(f) for f in (train, generate, load, prepare)); print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    import gptforge

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gptforge.nope


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = readme_python_example()
    assert "from gptforge import" in code
    (tmp_path / "texts").mkdir()
    corpus = ROOT / "src" / "gptforge"
    for i, path in enumerate(sorted(corpus.rglob("*.py"))):
        (tmp_path / "texts" / f"{i:03d}.txt").write_text(path.read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert isinstance(namespace["text"], str) and namespace["result"].step > 0
    assert (tmp_path / namespace["cfg"].run.dir / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- one spelling per option
def test_train_takes_the_short_spellings(tmp_path):
    from gptforge.commands.train import build_config

    short, _ = build_config(["--device", "cpu", "--precision=fp32", "--seed", "7", "--preset", "nano"])
    dotted, _ = build_config(["--run.device", "cpu", "--run.precision=fp32", "--run.seed", "7", "--model.preset", "nano"])
    assert short == dotted and (short.run.device, short.run.precision, short.run.seed, short.model.preset) == (
        "cpu", "fp32", 7, "nano")
    cfg, _ = build_config(["--run.name", "--device"])  # a value is never rewritten
    assert cfg.run.name == "--device"


@pytest.mark.parametrize("command,argv,expect", [
    ("evaluate", ["ck", "--run.device", "cpu", "--run.precision", "bf16"], {"device": "cpu", "precision": "bf16"}),
    ("evaluate", ["ck", "--device", "cpu", "--precision", "bf16"], {"device": "cpu", "precision": "bf16"}),
    ("sample", ["ck", "--run.device", "cpu", "--run.precision", "fp32", "--run.seed", "3"],
     {"device": "cpu", "precision": "fp32", "seed": 3}),
    ("sample", ["ck", "--device", "cpu", "--precision", "fp32", "--seed", "3"], {"device": "cpu", "precision": "fp32", "seed": 3}),
    ("bench", ["--run.device", "cpu", "--model.preset", "nano"], {"device": "cpu", "preset": "nano"}),
    ("bench", ["--device", "cpu", "--preset", "nano"], {"device": "cpu", "preset": "nano"}),
])
def test_commands_take_both_spellings(command, argv, expect):
    import importlib

    args = importlib.import_module(f"gptforge.commands.{command}").build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expect} == expect
