"""`gptforge plot RUN_DIR... --out FILE.png`: loss and perplexity curves of one or more runs."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptforge plot",
        description="Train loss, val loss and val perplexity vs step and tokens seen; several runs overlaid, "
        "labelled by what differs in their configs.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", required=True, help="output image (.png; .svg and .pdf work too)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="EMA factor in [0, 1) for the train loss, e.g. 0.9; the raw curve stays faint behind (default 0)")
    p.add_argument("--log", action="store_true", help="log-scale y axes for loss and perplexity")
    p.add_argument("--x", choices=["both", "step", "tokens"], default="both",
                   help="x axis: a row vs step and a row vs tokens seen (both, default), or one of them")
    return p


def main(argv: list[str]) -> int:
    from gptforge.plot import plot_runs

    args = build_parser().parse_args(argv)
    out = plot_runs(args.runs, args.out, smooth=args.smooth, log_scale=args.log, x=args.x)
    print(f"wrote {out}")
    return 0
