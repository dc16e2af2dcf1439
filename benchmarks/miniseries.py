#!/usr/bin/env python
"""A miniseries: the modern recipe at depths d1..dk, each trained at a few fixed FLOPs budgets, and
the scaling-law picture drawn from it (Chinchilla's approach 2).

Each depth d is `--model.depth d` (width 64 d, heads of 64; where that flag is missing, the same
shape by --model.n_layer/n_embd/n_head). A run's steps are its budget over its FLOPs per step:

    steps = budget / (flops_per_token x batch_tokens),   flops_per_token = 6 N + 12 L H Q T

(GPT.flops_per_token: N the parameters less the embedding lookups, the head included; the second
term is attention's), so every run of a budget spends the same compute. Then, for each budget, a
parabola of final val bits per byte against log N across the depths: its vertex is the optimal
size N_opt (and D_opt = budget / flops_per_token(N_opt) tokens); power laws N_opt ~ C^a and
D_opt ~ C^b over the budgets; and the implied tokens-per-parameter ratio D_opt / N_opt, beside
Chinchilla's 20. A vertex outside the depths tried is marked (an extrapolation: widen the grid).

Every run is `python -m gptforge train` in its own process, into its own run dir under --out,
all on one data cache (the embedded python-stdlib corpus, a BPE of --vocab ids trained on it);
a finished run (its done.json) is not run again, so the same command again prints the tables at
once. The plot: val bpb against FLOPs per depth with the fitted optima, and val bpb against N per
budget with its parabola.

    python benchmarks/miniseries.py                                   # the default grid (printed estimate)
    python benchmarks/miniseries.py --depths 1 2 3 --budgets 1e12 3e12 --out runs/mini-test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

CHINCHILLA = 20.0  # tokens per parameter (Hoffmann et al. 2022)


@dataclass
class Run:
    depth: int
    aspect: int  # model.aspect_ratio: width per layer
    budget: float
    params: int  # N: parameters less the embedding lookups (GPT.num_params(non_embedding=True))
    flops_per_token: float
    steps: int
    name: str

    @property
    def tokens(self) -> float:
        return self.budget / self.flops_per_token

    @property
    def shape(self) -> str:
        """d3 (width 64 per layer, the dial's default), or d3a32 for another aspect ratio."""
        return f"d{self.depth}" if self.aspect == 64 else f"d{self.depth}a{self.aspect}"


def has_depth_flag() -> bool:
    """Whether this gptforge has --model.depth (width and heads derived from it)."""
    from gptforge.config import ModelArgs

    return "depth" in {f.name for f in fields(ModelArgs)}


def shape_flags(depth: int, explicit: bool, aspect_ratio: int = 64, head_dim: int = 64) -> list[str]:
    if not explicit:
        return ["--model.depth", str(depth), "--model.aspect_ratio", str(aspect_ratio), "--model.head_dim", str(head_dim)]
    width = -(-depth * aspect_ratio // head_dim) * head_dim  # rounded up to whole heads, as model.depth does
    return ["--model.n_layer", str(depth), "--model.n_embd", str(width), "--model.n_head", str(width // head_dim)]


def model_flags(depth: int, aspect: int, args) -> list[str]:
    return ["--model.preset", "mini", "--model.arch", "modern",
            *shape_flags(depth, args.explicit_shape, aspect, min(args.head_dim, aspect)),
            "--data.seq_len", str(args.seq_len)]


def size_of(depth: int, aspect: int, args, vocab: int) -> tuple[int, float]:
    """(N, flops_per_token) of depth d as the trainer will build it (on the meta device: no memory)."""
    import torch

    from gptforge import config as C
    from gptforge.model import GPT

    flags = model_flags(depth, aspect, args)
    cfg = C.resolve(None, [(flags[i][2:], flags[i + 1]) for i in range(0, len(flags), 2)])
    with torch.device("meta"):
        model = GPT(cfg.model.gpt_config(vocab_size=vocab))
    return model.num_params(non_embedding=True), model.flops_per_token(args.seq_len)


def plan(args, vocab: int) -> list[Run]:
    runs = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else \
        [(d, a) for a in args.aspect_ratio for d in args.depths]
    for d, a in shapes:
        n, fpt = size_of(d, a, args, vocab)
        for c in args.budgets:
            steps = max(1, round(c / (fpt * args.batch_tokens)))
            run = Run(d, a, c, n, fpt, steps, "")
            run.name = f"{run.shape}-c{c:.2g}".replace("+", "")
            runs.append(run)
    return runs


def prepare(out: Path, env: dict, vocab: int) -> tuple[Path, int]:
    """The embedded corpus tokenized with a BPE of `vocab` ids trained on it; (dir, its vocab size)."""
    data = out / "data"
    if not (data / "manifest.json").exists():
        cmd = [sys.executable, "-m", "gptforge", "prepare", "python-stdlib", "--out", str(data),
               "--tokenizer", f"train:{vocab}", "--quiet"]
        subprocess.run(cmd, env=env, check=True)
    return data, int(json.loads((data / "manifest.json").read_text())["vocab_size"])


def train(run: Run, data: Path, args, env: dict) -> Path:
    run_dir = args.out / run.name
    if (run_dir / "done.json").exists():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = [*model_flags(run.depth, run.aspect, args), "--optim.batch_tokens", str(args.batch_tokens),
             "--run.max_steps", str(run.steps), "--optim.warmup_steps", str(max(1, min(args.warmup, run.steps // 5))),
             "--run.eval_every", "0", "--run.eval_tokens", str(args.eval_tokens), "--run.ckpt_every", "0",
             "--run.sample_tokens", "0", *args.extra]
    cmd = [sys.executable, "-m", "gptforge", "train", "--data.dir", str(data), "--run.dir", str(run_dir), *flags]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (args.out / f"{run.name}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{run.name}: gptforge train failed (exit {p.returncode}); see {args.out / (run.name + '.log')}\n"
                         f"{p.stderr[-1500:]}")
    (run_dir / "done.json").write_text(json.dumps({"flags": flags, "wall_s": round(wall, 1), "load_before": load0,
                                                   "load_after": os.getloadavg()[0]}) + "\n")
    print(f"  {run.name}: N {run.params / 1e6:.2f}M, {run.steps} steps, {wall:.0f} s wall, "
          f"final val bpb {final_bpb(run_dir):.4f}", flush=True)
    return run_dir


def final_bpb(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "val_bpb" in r][-1]["val_bpb"]


def fit_optimum(params: list[float], bpb: list[float]) -> tuple[float, float, bool]:
    """Chinchilla's approach 2 for one budget: the vertex of a parabola of val bpb against ln N
    through the best size tried and its two neighbours (a parabola through every size would be
    pulled by the far ones: the curve is no parabola that far from its minimum); returns (N at the
    vertex, bpb there, whether the optimum is bracketed). Where the best size is the smallest or
    the largest tried (the optimum lies beyond), or fewer than three sizes: the best size tried
    (and False)."""
    x, y = np.log(np.asarray(params, float)), np.asarray(bpb, float)
    best = int(np.argmin(y))
    if len(x) < 3 or best in (0, len(x) - 1):
        return float(params[best]), float(y[best]), False
    a, b, c = np.polyfit(x[best - 1:best + 2], y[best - 1:best + 2], 2)
    xv = -b / (2 * a)  # a > 0: the middle point is the lowest of the three
    return float(math.exp(xv)), float(c - b * b / (4 * a)), True


def power_law(x: list[float], y: list[float]) -> tuple[float, float]:
    """(exponent, coefficient) of y = coefficient * x^exponent, least squares in log-log."""
    e, k = np.polyfit(np.log(x), np.log(y), 1)
    return float(e), float(math.exp(k))


def analyse(runs: list[Run], bpb: dict[str, float]) -> list[dict]:
    """Per budget: the optimum size, its tokens and bpb (fit_optimum)."""
    out = []
    for c in sorted({r.budget for r in runs}):
        rs = sorted((r for r in runs if r.budget == c), key=lambda r: r.params)
        n_opt, b_opt, inside = fit_optimum([r.params for r in rs], [bpb[r.name] for r in rs])
        # flops per token at N_opt: interpolated in log-log between the depths (attention's share varies)
        fpt = math.exp(np.interp(math.log(n_opt), [math.log(r.params) for r in rs], [math.log(r.flops_per_token) for r in rs]))
        d_opt = c / fpt
        best = min(rs, key=lambda r: bpb[r.name])
        out.append({"budget": c, "n_opt": n_opt, "d_opt": d_opt, "ratio": d_opt / n_opt, "bpb": b_opt,
                    "inside": inside, "best_shape": best.shape})
    return out


def report(runs: list[Run], bpb: dict[str, float], args) -> list[dict]:
    from gptforge.measure import cpu_model_name

    opt = analyse(runs, bpb)
    shapes = sorted({r.shape for r in runs}, key=lambda s: next(r.params for r in runs if r.shape == s))
    print(f"\n{cpu_model_name()} ({os.cpu_count()} cores); modern recipe, seq {args.seq_len}, "
          f"batch {args.batch_tokens:,} tokens, BPE {args.vocab}; final val bits per byte\n")
    print("| FLOPs | " + " | ".join(f"{s} (N {next(r.params for r in runs if r.shape == s) / 1e6:.3f}M)" for s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for c in sorted({r.budget for r in runs}):
        cells = [next((f"{bpb[r.name]:.4f} ({r.tokens / r.params:.1f} tok/N)" for r in runs
                       if r.shape == s and r.budget == c), "-") for s in shapes]
        print(f"| {c:.1e} | " + " | ".join(cells) + " |")
    print("\n| FLOPs | best size tried | N_opt (fit) | D_opt tokens | D_opt / N_opt | val bpb at N_opt |")
    print("|---|---|---|---|---|---|")
    for o in opt:
        mark = "" if o["inside"] else " (outside the sizes tried)"
        print(f"| {o['budget']:.1e} | {o['best_shape']} | {o['n_opt'] / 1e6:.3f}M{mark} | {o['d_opt'] / 1e6:.2f}M | "
              f"{o['ratio']:.1f} | {o['bpb']:.4f} |")
    inside = [o for o in opt if o["inside"]]  # an optimum beyond the sizes tried is only a bound
    ratios = [o["ratio"] for o in inside]
    if len(inside) >= 2:
        a, ka = power_law([o["budget"] for o in inside], [o["n_opt"] for o in inside])
        b, kb = power_law([o["budget"] for o in inside], [o["d_opt"] for o in inside])
        print(f"\nover the {len(inside)} bracketed budgets: N_opt ~ C^{a:.2f}, D_opt ~ C^{b:.2f} (Chinchilla: 0.50, 0.50); "
              f"tokens per parameter at the optimum {min(ratios):.1f}..{max(ratios):.1f}, geometric mean "
              f"{math.exp(np.mean(np.log(ratios))):.1f} (Chinchilla {CHINCHILLA:g})")
    elif inside:
        print(f"\none bracketed budget ({inside[0]['budget']:.1e} FLOPs): {ratios[0]:.1f} tokens per parameter at the "
              f"optimum (Chinchilla {CHINCHILLA:g}); a power law needs two: add sizes or budgets")
    else:
        print("\nno budget's optimum is bracketed by the sizes tried: add smaller or larger sizes")
    return opt


def plot(runs: list[Run], bpb: dict[str, float], opt: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in sorted({r.shape for r in runs}, key=lambda s: next(r.params for r in runs if r.shape == s)):
        rs = sorted((r for r in runs if r.shape == s), key=lambda r: r.budget)
        left.plot([r.budget for r in rs], [bpb[r.name] for r in rs], "o-", label=f"{s} ({rs[0].params / 1e6:.3f}M)")
    inside = [o for o in opt if o["inside"]]
    left.plot([o["budget"] for o in inside], [o["bpb"] for o in inside], "k*--", ms=12, label="fitted optimum (bracketed)")
    left.set(xscale="log", xlabel="training FLOPs", ylabel="final val bits per byte", title="val bpb vs compute")
    left.legend(fontsize=8)
    for o in opt:
        rs = sorted((r for r in runs if r.budget == o["budget"]), key=lambda r: r.params)
        x, y = [r.params for r in rs], [bpb[r.name] for r in rs]
        (line,) = right.plot(x, y, "o-", alpha=0.5, label=f"{o['budget']:.2g} FLOPs")
        if o["inside"]:  # the parabola fit_optimum drew: through the best size and its neighbours
            best = int(np.argmin(y))
            coef = np.polyfit(np.log(x[best - 1:best + 2]), y[best - 1:best + 2], 2)
            xs = np.exp(np.linspace(np.log(x[best - 1]), np.log(x[best + 1]), 50))
            right.plot(xs, np.polyval(coef, np.log(xs)), "-", color=line.get_color())
            right.plot([o["n_opt"]], [o["bpb"]], "*", color=line.get_color(), ms=12)
    right.set(xscale="log", xlabel="parameters N (less embeddings)", ylabel="final val bits per byte",
              title="isoFLOP curves (star: parabola through the best 3)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/miniseries"))
    # at CPU scale the optimum lies near d1-d2: d1 at the smallest budget already sees ~25 tokens
    # per parameter, d3 at the largest ~1 (the grid brackets the optimum; ~22 min at 60 GFLOP/s)
    p.add_argument("--depths", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--aspect-ratio", type=int, nargs="*", default=[64],
                   help="width per layer (model.aspect_ratio), one or more (each with every depth); heads are min(head_dim, it) wide")
    p.add_argument("--shapes", nargs="*", default=None, help="DEPTHxASPECT pairs instead of depths x aspect ratios, e.g. 1x64 2x32 3x32")
    p.add_argument("--head-dim", type=int, default=64, help="model.head_dim")
    p.add_argument("--budgets", type=float, nargs="*", default=[2.5e12, 6e12, 1.5e13], help="training FLOPs of each run")
    p.add_argument("--vocab", type=int, default=1024, help="the BPE trained on the corpus (a small head keeps d1 small)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=20, help="warmup steps (at most a fifth of a run's steps)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="the final evaluation of every run")
    p.add_argument("--gflops", type=float, default=60.0,
                   help="achieved GFLOP/s assumed for the time estimate (tiny models on 2 EPYC cores: ~60)")
    p.add_argument("--explicit-shape", action="store_true", default=None,
                   help="--model.n_layer/n_embd/n_head instead of --model.depth (the default where that flag is missing)")
    p.add_argument("--plot", type=Path, default=None, help="the figure (default: OUT/miniseries.png)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and the time estimate only")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more gptforge train flags for every run, after --")
    args = p.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    if args.explicit_shape is None:
        args.explicit_shape = not has_depth_flag()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GPTFORGE_CACHE": str(args.out / "cache")}

    data, vocab = prepare(args.out, env, args.vocab)
    runs = plan(args, vocab)
    todo = [r for r in runs if not (args.out / r.name / "done.json").exists()]
    compute = sum(r.budget for r in todo)
    print(f"{len(runs)} runs ({len(todo)} to do): depths {args.depths} x budgets {[f'{c:.2g}' for c in args.budgets]}; "
          f"{compute:.2e} FLOPs to do: about {(compute / (args.gflops * 1e9) + 15 * len(todo)) / 60:.0f} min at "
          f"{args.gflops:g} GFLOP/s and ~15 s of startup and evaluation a run", flush=True)
    for r in runs:
        print(f"  {r.name}: N {r.params / 1e6:.3f}M, {r.flops_per_token / 1e6:.2f} MFLOP/token, {r.steps} steps, "
              f"{r.tokens / r.params:.1f} tokens/param", flush=True)
    if args.dry_run:
        return
    bpb = {r.name: final_bpb(train(r, data, args, env)) for r in runs}
    opt = report(runs, bpb, args)
    path = args.plot or args.out / "miniseries.png"
    plot(runs, bpb, opt, path)
    (args.out / "fit.json").write_text(json.dumps({"runs": {r.name: {"depth": r.depth, "aspect_ratio": r.aspect, "budget": r.budget, "params": r.params,
                                                                     "steps": r.steps, "val_bpb": bpb[r.name]} for r in runs},
                                                   "optima": opt}, indent=1) + "\n")
    print(f"\nplot: {path}; fit: {args.out / 'fit.json'}")


if __name__ == "__main__":
    main()
