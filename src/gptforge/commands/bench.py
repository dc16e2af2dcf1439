"""`gptforge bench`: the precision / attention / compile speed ladder on this device."""

from __future__ import annotations

import argparse

from gptforge.bench import LADDER
from gptforge.commands.options import add_shared
from gptforge.model import RECIPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptforge bench",
        description="The same model and batch through the ladder " + " -> ".join(r.name for r in LADDER)
        + ", each rung adding one thing; tokens/s, step time, MFU, peak memory and speedup over fp32 per rung. "
        "Rungs that mean nothing on the device are reported as n/a with the reason. Writes bench.json and "
        "bench.png (tokens/s per rung) to --out.",
    )
    add_shared(p, "preset", default="", help="model preset (default: gpt2 on CUDA, tiny elsewhere)")
    p.add_argument("--model.arch", dest="arch", default="gpt2", choices=list(RECIPES),
                   help="the recipe of model switches (gptforge.model.RECIPES; default gpt2)")
    p.add_argument("--batch", type=int, default=0, help="micro-batch size B (default: 16 on CUDA, 4 elsewhere)")
    p.add_argument("--seq-len", type=int, default=0, help="sequence length T (default: the preset's block_size)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per rung (default: 10 on CUDA, 3 elsewhere)")
    p.add_argument("--warmup", type=int, default=-1,
                   help="untimed warm-up steps per rung, at least 1 where compiling (default: 3 on CUDA, 1 elsewhere)")
    add_shared(p, "device", default="auto")
    p.add_argument("--out", default="bench", help="directory for bench.json and bench.png (default: ./bench)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="MFU denominator in TFLOP/s (default: the GPU table, else a matmul probe)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--skip", action="append", default=[], choices=[r.name for r in LADDER],
                   help="report this rung as n/a without running it (repeatable)")
    return p


def main(argv: list[str]) -> int:
    from gptforge.bench import BenchArgs, format_table, run_ladder, write_outputs

    a = build_parser().parse_args(argv)
    args = BenchArgs(preset=a.preset, arch=a.arch, batch=a.batch, seq_len=a.seq_len, steps=a.steps, warmup=a.warmup,
                     device=a.device, out=a.out, peak_tflops=a.peak_tflops, skip=tuple(a.skip),
                     threads=a.threads)
    report = run_ladder(args)
    print()
    print(format_table(report))
    json_path, png_path = write_outputs(report, a.out)
    print(f"wrote {json_path} and {png_path}")
    return 0
