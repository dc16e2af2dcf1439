#!/usr/bin/env python
"""Peak memory of one training step with and without activation checkpointing.

Each variant runs in its own subprocess, so one's allocations never inflate the other's figure:
build the model and AdamW, run one warm-up step (which allocates the optimizer state), then
measure a second full step (forward, backward, optimizer) on the trainer's loss path.

    CUDA: torch.cuda.max_memory_allocated during the measured step, minus what was allocated
          before it (weights + optimizer state): the step's own peak.
    CPU:  peak RSS growth during the measured step: VmHWM (reset to the current RSS through
          /proc/self/clear_refs just before the step) minus VmRSS before it. glibc's malloc is
          told to hand big blocks straight back to the OS (MALLOC_MMAP_THRESHOLD_), so memory
          freed by the warm-up step does not hide the measured step's growth.

Also printed: the measured step's time with checkpointing relative to without (the recompute),
measured side by side in one run.

    python benchmarks/bench_memory.py                          # CPU: 12 x 256, B=4, T=256 (about a minute)
    python benchmarks/bench_memory.py --preset gpt2-medium --batch 8 --seq 1024   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(a: argparse.Namespace) -> dict:
    from gptforge.device import Runtime
    from gptforge.loss import HeadLoss
    from gptforge.model import GPT, preset
    from gptforge.training.distributed import apply_activation_checkpointing
    from gptforge.training.optim import make_optimizer
    from gptforge.config import OptimArgs

    rt = Runtime.make(a.device, a.precision)
    sizes = {} if a.preset != "custom" else dict(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    torch.manual_seed(0)
    model = GPT(preset("gpt2" if a.preset == "custom" else a.preset, block_size=a.seq, **sizes)).to(rt.device)
    if a.ac:
        apply_activation_checkpointing(model)
    optimizer = make_optimizer(model, OptimArgs(), rt.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (a.batch, a.seq), generator=g).to(rt.device)
    y = torch.randint(0, 50257, (a.batch, a.seq), generator=g).to(rt.device)
    cuda = rt.device.type == "cuda"

    model.head_loss = HeadLoss("plain" if cuda else "fused")  # the trainer's loss path: fused on CPU

    def step() -> None:
        with rt.autocast():
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, kernels, thread pools
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {"ac": a.ac, "peak_growth_bytes": peak - before, "baseline_bytes": before, "step_s": dt,
            "params": model.num_params(), "device": str(rt.device), "precision": rt.precision,
            "config": model.config.to_dict()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="custom", help="a model preset, or custom (--n-layer/--n-head/--n-embd)")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", default="")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}  # a fixed threshold: big frees go back
    argv = [a for a in sys.argv[1:] if a != "--json" and not a.startswith("--json=")]
    if a.json:
        argv = [x for i, x in enumerate(argv) if not (i > 0 and argv[i - 1] == "--json") and x != a.json]
    results = []
    for ac in (False, True):
        cmd = [sys.executable, __file__, *argv, "--child"] + (["--ac"] if ac else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    off, on = results
    c = off["config"]
    kind = "max_memory_allocated" if off["device"].startswith("cuda") else "peak RSS growth"
    print(f"model {c['n_layer']} layers x {c['n_embd']} ({off['params'] / 1e6:.1f}M parameters), "
          f"batch {a.batch} x {a.seq} tokens, {off['device']}, {off['precision']}; {kind} of one training step:")
    for r, name in ((off, "without activation checkpointing"), (on, "with activation checkpointing")):
        print(f"  {name:34s} {r['peak_growth_bytes'] / MiB:8.0f} MiB   step {r['step_s']:.2f} s")
    print(f"  ratio with/without: memory {on['peak_growth_bytes'] / off['peak_growth_bytes']:.2f}, "
          f"time {on['step_s'] / off['step_s']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
