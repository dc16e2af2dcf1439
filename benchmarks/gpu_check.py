#!/usr/bin/env python
"""The Python half of benchmarks/gpu_check.sh: one subcommand per stage, each writing into OUT.

    env OUT                 GPU, driver, torch, CUDA, free memory -> OUT/env.json (and printed)
    probe OUT               the largest micro-batch of gpt2 at T=1024 whose heaviest ladder rung
                            (fp32, manual attention, plain loss, AdamW) fits -> OUT/probe.json
    train OUT ARGS...       `gptforge train ARGS` in this process, then its CUDA peak memory
                            -> OUT/<run name>.peak.json
    summary OUT             OUT/summary.md from everything the stages left there

Run by gpu_check.sh with PYTHONPATH=src; usable alone the same way.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cmd_env(out: Path) -> int:
    import torch

    dev = torch.device("cuda", 0)
    free, total = torch.cuda.mem_get_info(dev)
    props = torch.cuda.get_device_properties(dev)
    driver = ""
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        driver = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else ""
    from gptforge.measure import cpu_model_name, gpu_table_key

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(dev), "gpus": torch.cuda.device_count(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "memory_total_gib": round(total / 2**30, 1), "memory_free_gib": round(free / 2**30, 1),
        "sm_count": props.multi_processor_count, "driver": driver or "unknown (no nvidia-smi)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "bf16": torch.cuda.is_bf16_supported(), "python": platform.python_version(),
        "peak_table_entry": gpu_table_key(torch.cuda.get_device_name(dev)),
        "cpu": cpu_model_name(), "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    (out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    for k, v in info.items():
        print(f"{k:>18}: {v}")
    return 0


def cmd_probe(out: Path) -> int:
    """Largest B in 32, 24, 16, 12, 8, 4, 2, 1 for which one fp32 step of the ladder's first rung
    (gpt2, manual attention, logits + cross_entropy, AdamW) fits, with 10% of the memory spare."""
    import torch
    import torch.nn.functional as F

    from gptforge.model import GPT, preset

    dev = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = GPT(preset("gpt2", attention="manual")).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    total = torch.cuda.get_device_properties(dev).total_memory
    found, tried = 0, {}
    for B in (32, 24, 16, 12, 8, 4, 2, 1):
        x = torch.randint(0, 50257, (B, 1024), device=dev)
        try:
            torch.cuda.reset_peak_memory_stats(dev)
            logits, _ = model(x)
            F.cross_entropy(logits.float().view(-1, logits.size(-1)), x.view(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            tried[B] = round(peak / 2**30, 1)
            if peak < 0.9 * total:
                found = B
                break
        except torch.cuda.OutOfMemoryError:
            tried[B] = "OOM"
        finally:
            logits = None
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    res = {"batch": found, "peak_gib_tried": tried, "total_gib": round(total / 2**30, 1)}
    (out / "probe.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0 if found else 1


def cmd_train(out: Path, argv: list[str]) -> int:
    import torch

    from gptforge.commands.train import main

    name = os.environ.get("GPU_CHECK_STAGE", "train")
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    rc = main(argv)
    res = {"rc": rc, "wall_s": round(time.time() - t0, 1),
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    (out / f"{name}.peak.json").write_text(json.dumps(res) + "\n")
    print(json.dumps(res))
    return rc


# --------------------------------------------------------------------------- summary
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stage_status(out: Path) -> dict[str, str]:
    """stages.tsv lines: name, exit code, seconds (written by gpu_check.sh)."""
    status = {}
    try:
        for line in (out / "stages.tsv").read_text().splitlines():
            name, rc, secs = line.split("\t")
            if not rc.isdigit():
                status[name] = rc
                continue
            status[name] = ("ok" if rc == "0" else ("timed out" if rc in ("124", "137") else f"failed (exit {rc})")) + f", {secs} s"
    except (OSError, ValueError):
        pass
    return status


def _run_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return [], []
    return [r for r in rows if "loss" in r and "dt_ms" in r], [r for r in rows if "val_loss" in r]


def _tail(path: Path, pattern: str) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if re.search(pattern, ln)]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def cmd_summary(out: Path) -> int:
    env = _read_json(out / "env.json") or {}
    status = _stage_status(out)
    md = [f"### GPU check: {env.get('gpu', '?')} ({env.get('date', '?')})", "",
          f"`bash benchmarks/gpu_check.sh` on {env.get('gpus', '?')} x {env.get('gpu', '?')} "
          f"({env.get('memory_total_gib', '?')} GiB, compute capability {env.get('capability', '?')}), driver "
          f"{env.get('driver', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, triton "
          f"{env.get('triton', '?')}, Python {env.get('python', '?')}; host CPU {env.get('cpu', '?')} "
          f"({env.get('cpu_count', '?')} threads). MFU denominator: the dense peak table entry "
          f"`{env.get('peak_table_entry')}` of `gptforge/measure.py`.", ""]
    md += ["| stage | result |", "|---|---|"]
    for name in ("env", "pytest", "probe", "bench", "prepare", "train", "resume", "eval", "sample", "export"):
        md.append(f"| {name} | {status.get(name, 'not run')} |")
    md.append("")

    line = _tail(out / "pytest.log", r"(passed|failed|error|skipped)")
    md += ["#### `pytest -m gpu`", "", f"`{line or 'no result (see pytest.log)'}`", ""]
    failed = []
    try:
        failed = [ln for ln in (out / "pytest.log").read_text(errors="replace").splitlines() if ln.startswith(("FAILED", "ERROR"))]
    except OSError:
        pass
    if failed:
        md += ["```", *failed[:30], "```", ""]

    report = _read_json(out / "bench" / "bench.json")
    md += ["#### `gptforge bench` (gpt2, T=1024)", ""]
    if report:
        from gptforge.bench import format_table

        probe = _read_json(out / "probe.json") or {}
        md += [f"Micro-batch {report['batch']} (largest that fits the fp32 rung: {probe.get('peak_gib_tried', '?')} GiB peak "
               f"by B tried), {report['steps']} timed steps after {report['warmup']} warm-up.", "",
               "| rung | tok/s | step ms | MFU | peak MB | speedup | compile s | notes |", "|---|---|---|---|---|---|---|---|"]
        for r in report["rungs"]:
            if r["status"] != "ok":
                md.append(f"| {r['name']} | n/a | | | | | | {r['reason']} |")
                continue
            cs = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else ""
            md.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {100 * r['mfu']:.1f}% | "
                      f"{r['peak_mem_mb']:,.0f} | {r['speedup']:.2f}x | {cs} | {r['reason']} |")
        md += ["", f"MFU against {report['peak_tflops']:.0f} TFLOP/s ({report['peak_source']}); peak memory: {report['memory']}.",
               "The `fused_loss` rung against `fused_adamw` is the measurement that decides `run.lm_head_loss auto` "
               "on this GPU (see `measure.choose_lm_head_loss`).", ""]
        md += ["<details><summary>bench table as printed</summary>", "", "```", format_table(report), "```", "</details>", ""]
    else:
        md += ["no bench.json (see bench.log)", ""]

    md += ["#### 124M, short run with compile (the embedded corpus)", ""]
    rows, evals = _run_rows(out / "run")  # the first run and the resumed one, which appends to it
    if rows:
        warm = [r for r in rows if r["step"] >= 3] or rows  # compile and warm-up steps aside
        med = lambda k: statistics.median(r[k] for r in warm)  # noqa: E731
        peak = _read_json(out / "train.peak.json") or {}
        peak_r = _read_json(out / "resume.peak.json") or {}
        banner = _tail(out / "train.log", r"^batch ")
        loss_head = _tail(out / "train.log", r"^LM-head loss")
        md += [f"`{banner}`; `{loss_head}`", "",
               "| steps | tokens/s (median) | MFU (median) | step ms (median) | peak memory | last train loss | last val loss |",
               "|---|---|---|---|---|---|---|",
               f"| {rows[-1]['step'] + 1} | {med('tokens_per_s'):,.0f} | {100 * med('mfu'):.1f}% | {med('dt_ms'):.0f} | "
               f"{peak.get('peak_memory_gib', '?')} GiB (resumed: {peak_r.get('peak_memory_gib', '?')} GiB) | "
               f"{rows[-1]['loss']:.3f} | {evals[-1]['val_loss'] if evals else float('nan'):.3f} |", "",
               f"First step (compile): {rows[0]['dt_ms'] / 1000:.1f} s; train wall {peak.get('wall_s', '?')} s, "
               f"resume wall {peak_r.get('wall_s', '?')} s.", ""]
    else:
        md += ["no metrics (see train.log)", ""]
    for name, pattern in (("eval", r"val loss|ppl"), ("sample", r"."), ("export", r"wrote|export|saved")):
        text = _tail(out / f"{name}.log", pattern)
        if text:
            md.append(f"- `gptforge {name}`: {text[:300]}")
    md += ["", "No figure here was tuned by hand: every number is read from the files in this directory."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("env", "probe", "train", "summary"):
        print(__doc__)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if argv[0] == "env":
        return cmd_env(out)
    if argv[0] == "probe":
        return cmd_probe(out)
    if argv[0] == "train":
        return cmd_train(out, argv[2:])
    return cmd_summary(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
