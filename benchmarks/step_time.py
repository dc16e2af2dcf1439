#!/usr/bin/env python
"""Step time of `gptforge train` settings, side by side: short runs alternating A, B, A, B, ...

Each setting is `gptforge train` with the default flags plus its own (`NAME=FLAGS`), run --steps
steps --repeats times in turn, on the data the default run uses. A run's time is the median
`dt_ms` of its metrics after its first 3 steps (warm-up); a setting's is the fastest of its runs'
medians (on a shared machine, the least disturbed), and every ratio is to the first setting.

    python benchmarks/step_time.py "defaults=" "no normuon, no split=--optim.muon_normuon false --optim.muon_split false"
    python benchmarks/step_time.py "a=" "b=--model.smear true" --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gptforge.measure import cpu_model_name


def run_median_ms(flags: list[str], run_dir: Path, steps: int) -> float:
    cmd = [sys.executable, "-m", "gptforge", "train", "--run.dir", str(run_dir), *flags, "--run.max_steps", str(steps),
           "--run.eval_every", "0", "--run.eval_tokens", "4096", "--run.sample_tokens", "0", "--run.ckpt_every", "0",
           "--run.overwrite", "true"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"gptforge train {shlex.join(flags)} failed (exit {p.returncode}):\n{p.stderr[-1500:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dts = [r["dt_ms"] for r in rows if "dt_ms" in r][3:]
    return statistics.median(dts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", metavar="NAME=FLAGS", help="a name and gptforge train flags (may be empty)")
    p.add_argument("--steps", type=int, default=25, help="steps of each run (the first 3 are not timed)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting, alternating")
    args = p.parse_args()
    if args.steps < 5:
        raise SystemExit(f"--steps {args.steps}: expected at least 5 (the first 3 steps are not timed)")
    settings = {}
    for s in args.settings:
        if "=" not in s:
            raise SystemExit(f"{s!r}: expected NAME=FLAGS, e.g. 'split off=--optim.muon_split false'")
        name, flags = s.split("=", 1)
        settings[name] = shlex.split(flags)
    times: dict[str, list[float]] = {n: [] for n in settings}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gptforge-step-time-") as tmp:
        for _ in range(args.repeats):
            for i, (name, flags) in enumerate(settings.items()):
                times[name].append(run_median_ms(flags, Path(tmp) / f"s{i}", args.steps))
    first = min(next(iter(times.values())))
    print(f"{cpu_model_name()} ({os.cpu_count()} cores); {args.repeats} runs of {args.steps} steps each, alternating; load {load0:.1f}-{os.getloadavg()[0]:.1f}")
    print("| setting | flags | ms/step (fastest run's median) | every run's median | vs the first |")
    print("|---|---|---|---|---|")
    for name, flags in settings.items():
        best = min(times[name])
        print(f"| {name} | `{shlex.join(flags)}` | {best:.0f} | {', '.join(f'{t:.0f}' for t in times[name])} | {best / first:.3f}x |")


if __name__ == "__main__":
    main()
