#!/usr/bin/env python
"""The LM head + loss alone, forward and backward: the plain path (logits + F.cross_entropy)
against the fused, chunked one (loss.LinearCrossEntropy) with this device's chunk sizes
(device.lm_head_chunks), in fp32 and bf16 autocast; time and peak memory of each.

The implementations alternate round after round in one process, and the table shows the
fastest round of each, so the ratio is side by side. On a CPU the time is this process's CPU
time (time.process_time), which a shared machine disturbs far less than wall time; run it with
OMP_NUM_THREADS=1 there. On a GPU, wall time around synchronize.
Peak memory: CUDA max_memory_allocated; on a CPU the growth of peak RSS is not separable per
implementation in one process, so only time is shown there (see tests/test_lm_head.py for the
CPU memory bound of evaluation).

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_head.py        # B*T = 4*256 rows, C = 384 (tiny)
    OMP_NUM_THREADS=1 python benchmarks/bench_lm_head.py --rows 4096   # the tiny config's 16 x 256
    python benchmarks/bench_lm_head.py --rows 65536 --dim 768   # the 124M config's micro-batch, on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from gptforge.device import cpu_has_fast_bf16, lm_head_chunks, resolve_device, synchronize
from gptforge.loss import LinearCrossEntropy

V, VP = 50257, 50304


def step(kind: str, x, w, t, dtype, chunks) -> None:
    x.grad = w.grad = None
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        if kind == "plain":
            logits = (x @ w.t())[:, :V]
            loss = F.cross_entropy(logits.float(), t, ignore_index=-1)
        else:
            loss = LinearCrossEntropy.apply(x, w, t, V, *chunks)
    loss.backward()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024, help="B*T rows (default 1024 = 4 x 256)")
    p.add_argument("--dim", type=int, default=384, help="n_embd C (default 384, tiny)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="")
    a = p.parse_args()
    device = resolve_device(a.device)
    chunks = lm_head_chunks(device, VP)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(a.rows, a.dim, generator=g)).to(device).requires_grad_()
    w = (torch.randn(VP, a.dim, generator=g) * 0.02).to(device).requires_grad_()
    t = torch.randint(0, V, (a.rows,), generator=g).to(device)
    precisions = {"fp32": None}
    if device.type == "cuda" or cpu_has_fast_bf16():
        precisions["bf16"] = torch.bfloat16
    out = {"device": str(device), "rows": a.rows, "dim": a.dim, "chunks": chunks, "results": {}}
    for pname, dtype in precisions.items():
        times = {"plain": [], "fused": []}
        peaks = {}
        for kind in times:  # warm-up
            step(kind, x, w, t, dtype, chunks)
        for _ in range(a.rounds):
            for kind in times:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                clock = time.perf_counter if device.type == "cuda" else time.process_time
                synchronize(device)
                t0 = clock()
                step(kind, x, w, t, dtype, chunks)
                synchronize(device)
                times[kind].append(clock() - t0)
                if device.type == "cuda":
                    peaks[kind] = torch.cuda.max_memory_allocated(device) / 2**20
        for kind, ts in times.items():
            out["results"][f"{pname} {kind}"] = {"best_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3,
                                                 "peak_mb": peaks.get(kind)}
        ratio = min(times["plain"]) / min(times["fused"])
        out["results"][f"{pname} fused speedup"] = ratio
    print(f"LM head + loss, fwd+bwd | {device} | rows {a.rows} x C {a.dim} x V {VP} | chunks {chunks} | best of {a.rounds}")
    for k, v in out["results"].items():
        if isinstance(v, dict):
            peak = f"  peak {v['peak_mb']:.0f} MB" if v["peak_mb"] is not None else ""
            print(f"  {k:<14} {v['best_ms']:9.1f} ms (median {v['median_ms']:.1f}){peak}")
        else:
            print(f"  {k:<14} {v:9.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
