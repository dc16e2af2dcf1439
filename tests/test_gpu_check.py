"""benchmarks/gpu_check.sh on a machine without CUDA (one line, at once), its summary.md from
a stage directory, and scripts/copy_bpe_files.py (the BPE files for GPTFORGE_BPE_DIR)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 1
    assert p.stdout.splitlines() == ["gpu_check: no CUDA device visible to " + sys.executable
                                     + " (torch.cuda.is_available() is False); nothing to check"]
    assert p.stderr == "" and not out.exists()
    assert time.monotonic() - t0 < 60


def test_gpu_check_summary_reads_every_stage(tmp_path):
    """summary.md from what the stages leave: environment, stage results, pytest's line, the
    bench ladder, the short run's median tokens/s, MFU, step time and peak memory."""
    gc = load(ROOT / "benchmarks" / "gpu_check.py")
    out = tmp_path
    (out / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-01-01 00:00 UTC", "gpus": 1,
                                              "memory_total_gib": 79.1, "capability": "9.0", "driver": "550.54",
                                              "torch": "2.11.0+cu126", "cuda": "12.6", "triton": "3.3", "python": "3.12.3",
                                              "cpu": "x", "cpu_count": 16, "peak_table_entry": "H100"}))
    (out / "stages.tsv").write_text("env\t0\t3\npytest\t1\t150\nbench\t124\t190\ntrain\t0\t80\n")
    (out / "pytest.log").write_text("..F\nFAILED tests/test_gpu.py::test_x - boom\n1 failed, 20 passed in 150.0s\n")
    rung = {"status": "ok", "reason": "", "tokens_per_s": 123456.0, "step_ms": 132.7, "mfu": 0.4123, "peak_mem_mb": 30000.0,
            "speedup": 5.5, "compile_s": 41.0}
    (out / "bench").mkdir()
    (out / "bench" / "bench.json").write_text(json.dumps({
        "batch": 16, "steps": 5, "warmup": 2, "peak_tflops": 989.0, "peak_source": "bf16 peak of NVIDIA H100 80GB HBM3 (table)",
        "memory": "CUDA max_memory_allocated", "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11",
        "preset": "gpt2", "seq_len": 1024,
        "rungs": [{"name": "fp32", "adds": "", **rung}, {"name": "tf32", "adds": "", "status": "n/a", "reason": "why not"}]}))
    (out / "probe.json").write_text(json.dumps({"batch": 16, "peak_gib_tried": {"32": "OOM", "16": 60.2}}))
    (out / "run").mkdir()
    rows = [{"step": s, "loss": 10.0 - s / 10, "dt_ms": 30000.0 if s == 0 else 250.0, "tokens_per_s": 500000.0 + s,
             "mfu": 0.35, "tokens": 0} for s in range(30)]
    rows.insert(10, {"step": 10, "val_loss": 8.5, "val_ppl": 5000.0})
    (out / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "train.peak.json").write_text(json.dumps({"rc": 0, "wall_s": 80.0, "peak_memory_gib": 41.25}))
    (out / "train.log").write_text("batch 131072 tokens = 64 seqs x 1024 tokens x 1 ranks x 2 accumulation steps\n"
                                   "LM-head loss fused, chunks of 10672 rows (auto: fused)\n")
    (out / "eval.log").write_text("val loss 7.1234 | ppl 1240.00 (262,144 tokens)\n")
    assert gc.main(["summary", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert md.startswith("### GPU check: NVIDIA H100 80GB HBM3 (2026-01-01 00:00 UTC)")
    assert "| pytest | failed (exit 1), 150 s |" in md and "| bench | timed out, 190 s |" in md and "| resume | not run |" in md
    assert "`1 failed, 20 passed in 150.0s`" in md and "FAILED tests/test_gpu.py::test_x - boom" in md
    assert "| fp32 | 123,456 | 132.7 | 41.2% | 30,000 | 5.50x | 41.0 |  |" in md and "| tf32 | n/a |" in md
    assert "| 30 | 500,016 | 35.0% | 250 | 41.25 GiB" in md  # medians without the first three steps
    assert "First step (compile): 30.0 s" in md and "LM-head loss fused" in md
    assert "val loss 7.1234" in md


def test_copy_bpe_files_makes_a_directory_the_tokenizer_accepts(tmp_path):
    script = ROOT / "scripts" / "copy_bpe_files.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "bpe")], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "bpe").iterdir()) == ["encoder.json", "vocab.bpe"]
    assert f"export GPTFORGE_BPE_DIR={tmp_path / 'bpe'}" in p.stdout
    # only those files, no tiktoken cache: the encoding is GPT-2's
    check = ("from gptforge.tokenizer import Tokenizer, bpe_files; import sys; "
             "assert str(bpe_files()[0].parent) == sys.argv[1]; print(Tokenizer().encode('hello world'))")
    q = subprocess.run([sys.executable, "-c", check, str(tmp_path / "bpe")], capture_output=True, text=True, timeout=60,
                       env={**env, "GPTFORGE_BPE_DIR": str(tmp_path / "bpe"), "TIKTOKEN_CACHE_DIR": ""})
    assert q.returncode == 0, q.stderr
    assert q.stdout.strip() == "[31373, 995]"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vocab.bpe").write_text("not it")
    (tmp_path / "bad" / "encoder.json").write_text("{}")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "x")], capture_output=True, text=True, timeout=60,
                       env={**env, "GPTFORGE_BPE_DIR": str(tmp_path / "bad")})
    assert r.returncode == 1 and "is corrupted or not GPT-2's" in r.stderr
