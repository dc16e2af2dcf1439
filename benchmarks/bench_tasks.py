"""Requests per second of gptforge's downstream-task scorer against the same requests scored with
`transformers` on the exported model, side by side in one run, on this machine.

One model (random weights: speed does not depend on them) of the chosen preset and arch, with
GPT-2's tokenizer, is exported to a temporary Hugging Face directory. The first N examples of a
task are scored (1) by gptforge.eval.downstream.score (length batches, shared contexts once) and
(2) by transformers in the usual way (lm-eval-harness style): the same context + continuation
rows, cropped the same way, sorted by length, right-padded batches with an attention mask,
log_softmax and a gather. Both get the same batch budget; the largest per-request difference of
the two log-likelihoods is printed as a check. Then a GPU estimate for GPT-2 124M on all 10,042
HellaSwag examples, from the measured tokens per request and the peak table (an estimate, not a
measurement).

    python benchmarks/bench_tasks.py                                 # mini gpt2, hellaswag, 100 examples
    python benchmarks/bench_tasks.py --preset gpt2 --examples 50     # 124M (slow on a CPU)
    python benchmarks/bench_tasks.py --task arc_easy:rc_5shot        # long shared 5-shot contexts
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch


def hf_score(hf, rows, block_size: int, batch_tokens: int) -> list[float]:
    """transformers: right-padded length batches with an attention mask; summed continuation log-probs."""
    items = []
    for i, r in enumerate(rows):
        seq = (r.ctx + r.cont)[-block_size:]
        items.append((i, seq, max(len(seq) - len(r.cont), 1)))
    items.sort(key=lambda t: -len(t[1]))
    out = [0.0] * len(rows)
    k = 0
    while k < len(items):
        L = len(items[k][1])
        n = max(1, batch_tokens // L)
        batch = items[k: k + n]
        k += n
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for j, (_, seq, _) in enumerate(batch):
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (B, L, V)
        for j, (i, seq, start) in enumerate(batch):
            t = torch.arange(start, len(seq))
            out[i] = logp[j, t - 1, torch.tensor(seq[start:])].double().sum().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini", help="model preset (mini: 4 x 256; gpt2: 124M)")
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "modern"])
    p.add_argument("--task", default="hellaswag:rc_0shot")
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from gptforge import measure
    from gptforge import config as C
    from gptforge.device import Runtime
    from gptforge.eval.downstream import encode_task, score
    from gptforge.eval.tasks import load_task, parse_names
    from gptforge.interop.export import export_hf
    from gptforge.model import GPT
    from gptforge.tokenizer import Tokenizer

    cfg = C.resolve(None, [("model.preset", args.preset), ("model.arch", args.arch), ("model.pad_vocab", "false")])
    mc = cfg.model.gpt_config(50257)
    torch.manual_seed(0)
    model = GPT(mc).eval()
    tok = Tokenizer()
    task = load_task(parse_names(args.task)[0], args.examples)
    encoded = encode_task(task, tok)
    rows = [r for ex in encoded for r in ex]
    runtime = Runtime.make("cpu", "fp32")
    block = mc.block_size

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(model, Path(tmp) / "hf", tokenizer=tok)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

        score(model, encoded[:2], runtime, batch_tokens=args.batch_tokens)  # warm-up, both sides
        hf_score(hf, rows[:4], block, args.batch_tokens)
        t0 = time.perf_counter()
        ours = score(model, encoded, runtime, batch_tokens=args.batch_tokens)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = hf_score(hf, rows, block, args.batch_tokens)
        t_hf = time.perf_counter() - t0

    n = len(rows)
    diff = max(abs(a - b) for a, b in zip(ours.ll.tolist(), theirs))
    tokens = sum(min(len(r.ctx) + len(r.cont), block) for r in rows)
    print(f"CPU: {measure.cpu_model_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"model: {args.preset} {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"block_size {block}); task {task.spec.name}: {len(encoded)} examples, {n} requests, "
          f"{tokens / n:.1f} tokens per request row")
    print(f"{'scorer':<28} {'s':>7} {'requests/s':>11}")
    print(f"{'gptforge (eval --tasks)':<28} {t_ours:>7.2f} {n / t_ours:>11.1f}")
    print(f"{'transformers (exported)':<28} {t_hf:>7.2f} {n / t_hf:>11.1f}")
    print(f"ratio gptforge / transformers: {t_hf / t_ours:.2f}x; largest |log-likelihood difference| {diff:.2e}")

    # GPU estimate (not a measurement): 124M, HellaSwag rc_0shot, all 10,042 examples (40,168 requests)
    full = load_task(parse_names("hellaswag:rc_0shot")[0])
    hs_rows = [r for ex in encode_task(full, tok) for r in ex]
    hs_tokens = sum(min(len(r.ctx) + len(r.cont), 1024) for r in hs_rows)
    flops = 2 * 124.4e6 * hs_tokens  # forward only: 2 x parameters per token (attention is small at ~60 tokens)
    peak = measure.GPU_PEAK_TFLOPS["H100"]["bf16"] * 1e12
    for mfu in (0.10, 0.30):
        print(f"ESTIMATE (not measured): GPT-2 124M on HellaSwag's 10,042 examples ({len(hs_rows):,} requests, "
              f"{hs_tokens / 1e6:.2f}M tokens, {flops / 1e15:.2f} PFLOP) on one H100 bf16 at {mfu:.0%} MFU: "
              f"{flops / (peak * mfu):.1f} s")
    if not math.isfinite(diff) or diff > 1e-3:
        raise SystemExit(f"the two scorers disagree: {diff}")


if __name__ == "__main__":
    main()
