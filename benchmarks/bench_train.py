#!/usr/bin/env python
"""One training step (forward, backward, optimizer) of gptforge's GPT vs transformers' GPT2LMHeadModel.

Same architecture, batch, sequence length and precision for both, measured in one run, for every
precision mode the device has (CPU: fp32, and bf16 autocast where the CPU does bf16 natively; CUDA:
fp32, tf32, bf16), eager and torch.compile'd. Also measured in the same run: the dense matmul peak of
each dtype (square matmuls, best of a few sizes), and each step's achieved FLOP/s as a % of it.

    ours:       gptforge.model.GPT (flash attention, vocab padded to 50304, the trainer's fused
                head + loss: HeadLoss('fused')) + AdamW(fused where available)
    ours-plain: the same with HeadLoss('plain') (logits materialized, then F.cross_entropy)
    hf:         transformers.GPT2LMHeadModel (its default sdpa attention, labels= loss) + torch AdamW

FLOPs per token are the unpadded model's 6N + 12*L*H*Q*T for both (useful work only). Timing:
warm-up steps (and so compilation) excluded, device synchronized around every timed step; the
table shows the fastest of the timed steps (on a shared machine the least disturbed one; the
median is in the JSON), and the matmul peak is likewise the fastest square matmul of 1024, 2048
and 4096.

    python benchmarks/bench_train.py                       # tiny preset, B=8, T=256
    python benchmarks/bench_train.py --preset mini --batch 4 --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

import torch

from gptforge.bench import matmul_peak
from gptforge.device import Runtime, cpu_has_fast_bf16, synchronize
from gptforge.loss import HeadLoss
from gptforge.model import GPT, preset

GOALS = {"speedup_vs_hf": 2.0, "fp32_of_peak": 0.80, "bf16_of_peak": 0.60}


def precisions_of(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fp32", "tf32"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return ["fp32"] + (["bf16"] if cpu_has_fast_bf16() else [])


def build_ours(cfg_kw: dict, device: torch.device, fused_loss: bool = True):
    model = GPT(preset(cfg_kw["preset"], attention="flash", pad_vocab=True, **cfg_kw["arch"])).to(device)
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused or None)

    model.head_loss = HeadLoss("fused" if fused_loss else "plain")

    def loss_fn(m, x, y):
        return m(x, y)[1]

    return model, opt, loss_fn


def build_hf(cfg_kw: dict, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    c = preset(cfg_kw["preset"], **cfg_kw["arch"])
    hf_cfg = GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
                        vocab_size=c.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function="gelu_new", loss_type="ForCausalLM")
    model = GPT2LMHeadModel(hf_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def loss_fn(m, x, y):
        return m(input_ids=x, labels=x).loss  # HF shifts the labels itself: same work as (x, y)

    return model, opt, loss_fn


def time_steps(impl: str, precision: str, compiled: bool, args, device: torch.device) -> dict:
    rt = Runtime.make(str(device), precision)
    torch.manual_seed(0)
    cfg_kw = {"preset": args.preset, "arch": {"block_size": max(args.seq_len, preset(args.preset).block_size)}}
    if impl == "hf":
        model, opt, loss_fn = build_hf(cfg_kw, device)
    else:
        model, opt, loss_fn = build_ours(cfg_kw, device, fused_loss=impl == "ours")
    model.train()
    fwd = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (args.batch, args.seq_len), generator=g).to(device)
    y = torch.randint(0, 50257, (args.batch, args.seq_len), generator=g).to(device)

    def step():
        with rt.autocast():
            loss = loss_fn(fwd, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    del model, opt, fwd
    if compiled:
        torch._dynamo.reset()
    return {"impl": impl, "precision": precision, "mode": "compiled" if compiled else "eager",
            "step_ms": dt * 1000, "median_step_ms": statistics.median(times) * 1000,
            "tokens_per_s": args.batch * args.seq_len / dt, "warmup_s": warm, "loss": float(loss.detach())}


def flops_per_token(args) -> float:
    with torch.device("meta"):
        return GPT(preset(args.preset, block_size=max(args.seq_len, preset(args.preset).block_size))).flops_per_token(args.seq_len)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=0, help="default: the preset's block_size")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration; the fastest is reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for the whole run, peaks included (default: torch's choice)")
    p.add_argument("--precisions", default="", help="comma list (default: every mode the device has)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--impls", default="ours,ours-plain,hf", help="comma list of ours, ours-plain, hf")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or preset(args.preset).block_size
    if args.threads:
        torch.set_num_threads(args.threads)
    device = Runtime.make(args.device, "fp32").device
    precisions = args.precisions.split(",") if args.precisions else precisions_of(device)
    modes = [False] if args.no_compile else [False, True]
    fpt = flops_per_token(args)
    print(f"bench_train | torch {torch.__version__} | {device} ({torch.get_num_threads()} threads) | {args.preset} "
          f"B={args.batch} T={args.seq_len} | {fpt / 1e6:.1f} MFLOP/token | load average {os.getloadavg()[0]:.2f}",
          flush=True)

    peaks, rows = {}, []
    for prec in precisions:
        peaks[prec] = matmul_peak(device, prec)
        print(f"matmul peak {prec}: {peaks[prec] * 1000:.1f} GFLOP/s", flush=True)
        for compiled in modes:
            for impl in args.impls.split(","):
                r = time_steps(impl, prec, compiled, args, device)
                r["tflops"] = fpt * r["tokens_per_s"] / 1e12
                r["of_peak"] = r["tflops"] / peaks[prec]
                rows.append(r)
                print(f"  {impl:<5} {prec:<5} {r['mode']:<9} {r['tokens_per_s']:>9,.0f} tok/s {r['step_ms']:>9.1f} ms "
                      f"{r['tflops'] * 1000:>7.1f} GFLOP/s {r['of_peak'] * 100:>5.1f}% of peak  (warm-up {r['warmup_s']:.1f} s)",
                      flush=True)

    print("\n" + table(rows, peaks))
    verdict = goals(rows)
    for line in verdict["lines"]:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "device": str(device), "peaks_tflops": peaks,
                       "flops_per_token": fpt, "rows": rows, "goals": verdict}, f, indent=2)
    return 0


def table(rows: list[dict], peaks: dict) -> str:
    head = f"| impl | precision | mode | tokens/s | step ms (best) | step ms (median) | GFLOP/s | % of the dtype's matmul peak |"
    out = [head, "|" + "---|" * 8]
    for r in rows:
        out.append(f"| {r['impl']} | {r['precision']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                   f"{r['median_step_ms']:.1f} | {r['tflops'] * 1000:.1f} | {r['of_peak'] * 100:.1f}% |")
    out.append("matmul peaks: " + ", ".join(f"{k} {v * 1000:.1f} GFLOP/s" for k, v in peaks.items()))
    return "\n".join(out)


def goals(rows: list[dict]) -> dict:
    def best(impl, prec=None):
        sel = [r for r in rows if r["impl"] == impl and (prec is None or r["precision"] == prec)]
        return max(sel, key=lambda r: r["tokens_per_s"]) if sel else None

    lines, out = [], {}
    ours, hf = best("ours"), best("hf")
    if ours and hf:
        s = ours["tokens_per_s"] / hf["tokens_per_s"]
        out["speedup_vs_hf"] = s
        lines.append(f"best ours ({ours['precision']} {ours['mode']}) / best hf ({hf['precision']} {hf['mode']}) = "
                     f"{s:.2f}x (goal >= {GOALS['speedup_vs_hf']}x): {'met' if s >= GOALS['speedup_vs_hf'] else 'NOT met'}")
    for prec in ("fp32", "bf16"):
        r = best("ours", prec)
        if r:
            goal = GOALS[f"{prec}_of_peak"]
            out[f"{prec}_of_peak"] = r["of_peak"]
            lines.append(f"ours {prec} best ({r['mode']}) = {r['of_peak'] * 100:.1f}% of the {prec} matmul peak "
                         f"(goal >= {goal * 100:.0f}%): {'met' if r['of_peak'] >= goal else 'NOT met'}")
    out["lines"] = lines
    return out


if __name__ == "__main__":
    sys.exit(main())
