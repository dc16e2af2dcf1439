"""`gptforge bench`: the whole ladder runs on the CPU and reports every rung (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from gptforge.bench import LADDER, BenchArgs, format_table, resolve_args
from gptforge.commands.bench import main
from gptforge.errors import GPTForgeError

RUNGS = ["fp32", "tf32", "bf16", "flash", "pad_vocab", "compile", "fused_adamw", "fused_loss"]


@pytest.mark.slow
def test_ladder_on_cpu_reports_every_rung(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--model.preset", "nano", "--batch", "2", "--seq-len", "32", "--steps", "1", "--warmup", "1",
                 "--device", "cpu", "--peak-tflops", "1", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in report["rungs"]] == RUNGS == [r.name for r in LADDER]
    assert report["device"] == "cpu" and report["preset"] == "nano" and report["tokens_per_step"] == 64
    by = {r["name"]: r for r in report["rungs"]}
    assert by["tf32"]["status"] == "n/a" and "CUDA" in by["tf32"]["reason"]  # means nothing on a CPU
    assert by["fp32"]["status"] == "ok" and by["fp32"]["speedup"] == pytest.approx(1.0)
    for r in report["rungs"]:
        if r["status"] == "ok":
            assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["mfu"] > 0 and r["peak_mem_mb"] is not None
            assert r["speedup"] > 0 and r["loss"] > 0
        else:
            assert r["status"] == "n/a" and r["reason"], r
    if by["compile"]["status"] == "ok":
        assert by["compile"]["compile_s"] is not None and by["compile"]["config"]["run.compile"] == "true"
    # the configs are cumulative: the last rung has everything that ran before it
    last = by["fused_adamw"]["config"]
    assert last["optim.fused"] == "on" and last["model.attention"] == "flash" and last["model.pad_vocab"] == "true"
    assert last["run.precision"] == "bf16" and last["run.lm_head_loss"] == "plain"
    assert by["fused_loss"]["status"] == "ok" and by["fused_loss"]["config"]["run.lm_head_loss"] == "fused"
    assert by["fused_loss"]["config"]["optim.fused"] == "on"
    # what each rung ran, recorded: "plain, compiled (run.lm_head_loss)", "fused, chunks of N rows, ..."
    assert by["fused_adamw"]["lm_head"].startswith("plain") and by["fused_adamw"]["lm_head"].endswith("(run.lm_head_loss)")
    assert by["fused_loss"]["lm_head"].startswith("fused, chunks of ")
    if by["compile"]["status"] == "ok":  # the loss is compiled with the model
        assert ", compiled (" in by["fused_loss"]["lm_head"] and ", compiled (" in by["fused_adamw"]["lm_head"]
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    printed = capsys.readouterr().out
    table = format_table(report)
    assert table in printed
    for name in RUNGS:
        assert name in table


def test_arguments_are_resolved_and_validated_together():
    """Defaults per device; every bad argument named in one error."""
    args, device = resolve_args(BenchArgs(preset="nano", device="cpu", skip=("compile",)))
    assert device.type == "cpu" and args.batch == 4 and args.seq_len == 64 and args.steps == 3 and args.warmup == 1
    with pytest.raises(GPTForgeError, match=r"--seq-len must be in \[1, 64\].*--skip: unknown rungs \['turbo'\]"):
        resolve_args(BenchArgs(preset="nano", device="cpu", seq_len=65, skip=("turbo",)))
    with pytest.raises(GPTForgeError, match="unknown preset 'huge'"):
        resolve_args(BenchArgs(preset="huge", device="cpu"))


def test_miniseries_fit_finds_the_vertex_and_the_power_law(monkeypatch):
    """benchmarks/miniseries.py's fits: a parabola's vertex in ln N (Chinchilla's approach 2) through
    the best size and its neighbours, not pulled by far sizes; an optimum at the edge is not one; a
    log-log line."""
    import importlib.util
    import math
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("miniseries", Path(__file__).parent.parent / "benchmarks" / "miniseries.py")
    mini = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "miniseries", mini)  # its dataclass looks its module up there
    spec.loader.exec_module(mini)
    params = [1e5, 3e5, 1e6, 3e6]
    bpb = [2.0 + 0.3 * (math.log(n) - math.log(5e5)) ** 2 for n in params]
    n_opt, b_opt, inside = mini.fit_optimum(params, bpb)
    assert n_opt == pytest.approx(5e5, rel=1e-6) and b_opt == pytest.approx(2.0) and inside
    n_opt, _, inside = mini.fit_optimum(params, [3.0, 2.6, 2.3, 2.1])  # still falling: the vertex lies beyond
    assert not inside and n_opt == 3e6
    # far sizes off the parabola (a flattening tail) do not move the vertex fitted near the minimum
    wide = [3e4, 1e5, 3e5, 1e6, 3e6, 1e7]
    near = [2.0 + 0.3 * (math.log(n) - math.log(5e5)) ** 2 for n in wide]
    near[0], near[-1] = 2.5, 2.6
    n_opt, _, inside = mini.fit_optimum(wide, near)
    assert inside and 3e5 < n_opt < 1e6
    assert mini.fit_optimum(params[:2], [2.0, 1.9]) == (3e5, 1.9, False)  # two sizes: the better one
    e, k = mini.power_law([1e12, 1e13, 1e14], [2e5, 2e5 * 10 ** 0.5, 2e6])
    assert e == pytest.approx(0.5) and k * 1e12 ** 0.5 == pytest.approx(2e5)
