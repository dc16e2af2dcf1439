#!/usr/bin/env python
"""The default run's sweep: tokenizer x model x peak LR x steps, on the embedded corpus, by val
bits per byte within a wall-clock budget.

Each setting is `gptforge train` with its defaults but for the keys of the setting, run as its own
process on a fresh cache (GPTFORGE_CACHE=OUT/cache-NAME/, so the wall time includes training the
tokenizer, preparing the corpus and the precision probe, as a first `gptforge train` on a new
machine does), timed from outside (`time gptforge train`). A setting is

    TOKENIZER:MODEL:LR:STEPS[:ARCH]      e.g. train:4096:mini:2e-3:300 or gpt2:tiny:6e-4:60:gpt2

with TOKENIZER gpt2 or train:N (data.tokenizer), MODEL a preset or LxW (e.g. 4x256: that many
layers of that width, heads of 64), LR the peak learning rate (optim.lr: under Muon, of the
embeddings, head and gains), STEPS run.max_steps and ARCH modern (the default: the modern recipe
with Muon) or gpt2 (GPT-2 with AdamW, the default run before the sweep).
For every setting the table gives the wall time, the run's own val loss and val bpb (its
tokenizer's val split, the first run.eval_tokens tokens of it) and the bpb on one common text
for all: the first --common-chars characters of the corpus's first documents, which every
tokenizer's val split holds, so that the column compares like with like. Losses do not depend on
how busy the machine is; wall times do (the table prints the load average around each run).

    python benchmarks/sweep_default.py                                   # the settings below
    python benchmarks/sweep_default.py --settings train:4096:mini:2e-3:300 --out runs/sweep_default
    python benchmarks/sweep_default.py --summarize runs/sweep_default    # the table of finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SETTINGS = ["gpt2:tiny:6e-4:60:gpt2", "train:4096:mini:2e-3:300:gpt2", "train:4096:6x384:2e-3:150",
                    "train:4096:mini:2e-3:300", "train:4096:mini:2e-3:450", "train:4096:mini:2e-3:550",
                    "train:8192:mini:2e-3:300"]  # the README's table
BUDGET_S = 300


def parse_setting(text: str) -> dict:
    parts = text.split(":")
    if parts[0] == "train":
        tok, parts = f"train:{parts[1]}", parts[2:]
    else:
        tok, parts = parts[0], parts[1:]
    if len(parts) not in (3, 4):
        raise SystemExit(f"setting {text!r}: expected TOKENIZER:MODEL:LR:STEPS[:ARCH]")
    model, lr, steps = parts[:3]
    arch = parts[3] if len(parts) == 4 else "modern"
    keys = {"data.tokenizer": tok, "optim.lr": lr, "run.max_steps": steps, "model.arch": arch}
    m = re.fullmatch(r"(\d+)x(\d+)", model)
    if m:
        layers, width = int(m.group(1)), int(m.group(2))
        keys.update({"model.preset": "tiny", "model.n_layer": str(layers), "model.n_embd": str(width),
                     "model.n_head": str(max(1, width // 64))})
    else:
        keys["model.preset"] = model
    name = f"{arch}_{tok.replace(':', '')}_{model}_lr{lr}_s{steps}"
    return {"name": name, "tokenizer": tok, "model": model, "arch": arch, "lr": lr, "steps": int(steps), "keys": keys}


def load() -> float:
    return os.getloadavg()[0]


def run_one(setting: dict, out: Path, extra: list[str]) -> dict:
    run_dir = out / setting["name"]
    cache = out / f"cache-{setting['name']}"
    for d in (run_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    flags = [a for k, v in setting["keys"].items() for a in (f"--{k}", v)]
    cmd = [sys.executable, "-m", "gptforge", "train", *flags, "--run.dir", str(run_dir), *extra]
    env = {**os.environ, "GPTFORGE_CACHE": str(cache)}
    load_before, t0 = load(), time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"{setting['name']}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{setting['name']}: gptforge train failed (exit {p.returncode}); see its .log\n{p.stderr[-2000:]}")
    sample = p.stdout.split("--- sample ---\n", 1)[1].split("\n--------------", 1)[0] if "--- sample ---" in p.stdout else ""
    record = {"setting": setting, "wall_s": round(wall, 1), "load_before": round(load_before, 2),
              "load_after": round(load(), 2), "sample": sample, "data_dir": _data_dir(cache)}
    (run_dir / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _data_dir(cache: Path) -> str:
    found = sorted((cache / "data").glob("python-stdlib*"))
    return str(found[0]) if found else ""


def common_text(chars: int) -> list[str]:
    """The corpus's first documents, up to `chars` characters (the last one whole)."""
    from gptforge.data import sources

    docs, n = [], 0
    for doc in sources.iter_documents(sources.resolve_all([sources.STDLIB]), warn=lambda m: None):
        docs.append(doc)
        n += len(doc)
        if n >= chars:
            break
    return docs


def common_bpb(run_dir: Path, docs: list[str]) -> float:
    """Bits per byte of the run's final model on `docs`, in block_size windows, every target scored."""
    import torch

    from gptforge.device import Runtime
    from gptforge.eval.perplexity import evaluate_loss
    from gptforge.interop.load import load_pretrained, tokenizer_of

    model, tok = load_pretrained(run_dir), tokenizer_of(run_dir)
    ids = [t for d in docs for t in [tok.eot_id] + tok.encode(d)]
    T = model.config.block_size
    n = (len(ids) - 1) // T

    class Windows:
        def iter_epoch(self, max_batches=None):
            for i in range(0, n, 8):
                rows = [ids[j * T: j * T + T + 1] for j in range(i, min(n, i + 8))]
                t = torch.tensor(rows)
                yield t[:, :-1], t[:, 1:]

    return evaluate_loss(model, Windows(), Runtime.make("cpu", "fp32"), token_bytes=tok.token_bytes())["bpb"]


def summarize(out: Path, common_chars: int) -> list[dict]:
    docs = common_text(common_chars)
    rows = []
    for rec_path in sorted(out.glob("*/sweep.json")):
        rec = json.loads(rec_path.read_text())
        run_dir = rec_path.parent
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        vals = [r for r in metrics if "val_loss" in r]
        steps = [r for r in metrics if "dt_ms" in r]
        params = json.loads((run_dir / "config.json").read_text())
        rows.append({
            **{k: rec["setting"].get(k, "gpt2") for k in ("name", "tokenizer", "model", "arch", "lr", "steps")},
            "wall_s": rec["wall_s"], "load": f"{rec['load_before']:.1f}-{rec['load_after']:.1f}",
            "step_s": sum(r["dt_ms"] for r in steps[1:]) / max(len(steps) - 1, 1) / 1000,
            "val_loss": vals[-1]["val_loss"], "val_bpb": vals[-1].get("val_bpb"),
            "common_bpb": common_bpb(run_dir, docs), "sample": rec["sample"],
            "vocab": params["resolved"]["tokenizer"]["vocab_size"],
        })
    return rows


def print_table(rows: list[dict], common_chars: int) -> None:
    print(f"\n| arch | tokenizer | model | peak LR | steps | wall s (load) | s/step | val loss (nats/token) | val bpb | "
          f"bpb on the first {common_chars:,} chars |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['tokenizer']} ({r['vocab']:,}) | {r['model']} | {r['lr']} | {r['steps']} | {r['wall_s']:.0f} ({r['load']}) "
              f"| {r['step_s']:.2f} | {r['val_loss']:.3f} | {r['val_bpb']:.3f} | {r['common_bpb']:.3f} |")
    ok = [r for r in rows if r["wall_s"] <= BUDGET_S]
    if ok:
        best = min(ok, key=lambda r: r["common_bpb"])
        print(f"\nlowest bpb within {BUDGET_S} s: {best['name']} ({best['common_bpb']:.3f}); its sample:\n{best['sample']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, metavar="TOKENIZER:MODEL:LR:STEPS")
    p.add_argument("--out", type=Path, default=Path("runs/sweep_default"))
    p.add_argument("--summarize", type=Path, metavar="OUT", help="only tabulate the finished runs in OUT")
    p.add_argument("--common-chars", type=int, default=100_000)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more gptforge train flags, after --")
    args = p.parse_args()
    if args.summarize:
        print_table(summarize(args.summarize, args.common_chars), args.common_chars)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    for text in args.settings:
        rec = run_one(parse_setting(text), args.out, extra)
        print(f"{rec['setting']['name']}: {rec['wall_s']:.0f} s wall (load {rec['load_before']}-{rec['load_after']})",
              flush=True)
    print_table(summarize(args.out, args.common_chars), args.common_chars)


if __name__ == "__main__":
    main()
