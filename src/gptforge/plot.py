"""Runs -> one PNG: train loss, val loss and val perplexity against steps and tokens seen.

Layout: one column per metric (train loss | val loss | val perplexity, plus val bits per byte
and HellaSwag acc_norm when any run logged them) and one row per x axis. When the runs used
different tokenizers (config.json's resolved.tokenizer), nats per token mean different things
for each: the val columns are then bits per byte alone, and the figure says so. By default both rows are drawn (2 x 3): steps
are what the logs and checkpoints are named by, tokens seen is the fair axis when runs differ in
batch size. `x="step"` or `x="tokens"` draws one row (1 x 3) when only one of them matters.

Several runs are overlaid; each run's legend label is built from the keys of its config.json
whose values differ between the runs ("optim.lr=0.0006" vs "optim.lr=0.0003"), falling back
to the directory names. With smoothing, the train loss is drawn as an EMA over a faint raw
curve so that spikes stay visible; steps skipped by the spike guard are marked with an x.
Val curves are never smoothed: they are few points, each already an average.

Imports nothing of gptforge but fsutil and errors, and matplotlib only when drawing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import GPTForgeError
from gptforge.fsutil import atomic_path

METRICS = "metrics.jsonl"
CONFIG = "config.json"
IGNORED_LABEL_KEYS = {"run.dir"}  # always differs, and is the directory name anyway
PATH_LABEL_KEYS = {"data.dir", "model.init_from"}  # labelled by their last component (a legend is no place for a path)
MAX_LABEL_KEYS = 3  # more differing keys are summarized as "+N more"
GPT2_124M_ACC_NORM = 0.2955  # gptforge.eval.hellaswag.REFERENCE (not imported: plot stands alone)
X_CHOICES = ("both", "step", "tokens")


# ---------------------------------------------------------------- reading runs


@dataclass
class RunMetrics:
    """One run's metrics, split by kind, one row per step (sorted), plus its config (or None)."""

    run_dir: Path
    config: dict | None
    train: list[dict] = field(default_factory=list)  # rows with "loss"
    skipped: list[dict] = field(default_factory=list)  # rows with "skipped": true (spikes)
    val: list[dict] = field(default_factory=list)  # rows with "val_loss"
    hellaswag: list[dict] = field(default_factory=list)  # rows with "hellaswag_acc_norm"
    tasks: list[dict] = field(default_factory=list)  # rows with "tasks_centered" (run.eval_tasks)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(row: dict) -> str | None:
    if not _number(row.get("step")):
        return None
    if row.get("skipped") is True:
        return "skipped"
    if "val_loss" in row:
        return "val"
    if "hellaswag_acc_norm" in row:
        return "hellaswag"
    if "tasks_centered" in row:
        return "tasks"
    if "loss" in row:
        return "train"
    return None  # events and anything else: not plotted


def read_metrics(run_dir: str | Path) -> RunMetrics:
    """Parse RUN_DIR/metrics.jsonl (and config.json when present).

    Rows of other shapes are ignored. A resumed run appends rows for steps it had already
    logged: when a kind's step goes back, the earlier rows from that step on are dropped, so the
    last occurrence of every step wins and no row of an abandoned attempt survives. A truncated
    last line (a run writing right now, or killed mid-write) is skipped; any other bad line is
    an error naming the file and line.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GPTForgeError(f"{run_dir}: not a run directory (it does not exist)")
    path = run_dir / METRICS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise GPTForgeError(f"{run_dir}: no {METRICS} (is this a run directory? has the run logged a step yet?)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise GPTForgeError(f"{path}: cannot read ({e})") from e

    rows: dict[str, list[dict]] = {"train": [], "skipped": [], "val": [], "hellaswag": [], "tasks": []}
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # no newline after it: a partial write
                continue
            raise GPTForgeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        kind = _kind(row) if isinstance(row, dict) else None
        if kind is None:
            continue
        series = rows[kind]
        # rewound: resumed from a checkpoint. (Skipped steps are events: all of them are kept.)
        if kind != "skipped" and series and row["step"] <= series[-1]["step"]:
            series[:] = [r for r in series if r["step"] < row["step"]]
        series.append(row)

    metrics = RunMetrics(run_dir, _read_config(run_dir), **rows)
    if not (metrics.train or metrics.val):
        raise GPTForgeError(f"{run_dir}: {METRICS} has no train or validation loss rows yet")
    return metrics


def run_tokenizer(config: dict | None) -> str:
    """The name of the tokenizer a run used (runs from before tokenizers were recorded: gpt2)."""
    record = ((config or {}).get("resolved") or {}).get("tokenizer")
    return record.get("name", "gpt2") if isinstance(record, dict) else "gpt2"


def _read_config(run_dir: Path) -> dict | None:
    try:
        cfg = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


# ---------------------------------------------------------------- legend labels


def flatten(d: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 6e-4}} -> {"optim.lr": 6e-4}; lists are kept as values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str):
        return v if v else '""'
    return json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)


_MISSING = object()


def run_labels(configs: list[dict | None], names: list[str]) -> list[str]:
    """Legend labels from what differs between the configs: 'optim.lr=0.0006' or
    'optim.lr=0.0006, optim.warmup_steps=10'. Falls back to `names` with a single run, a
    missing config, or configs that differ only in ignored keys. Labels are always unique."""
    if len(configs) < 2 or any(c is None for c in configs):
        return _unique(list(names), names)
    # the `resolved` entry is what the trainer decided (micro-batch auto's RAM figures...), not a setting
    flats = [flatten({k: v for k, v in c.items() if k != "resolved"}) for c in configs]
    keys: list[str] = []
    for f in flats:  # union in config order (model, data, optim, run), not alphabetical
        keys += [k for k in f if k not in keys and k not in IGNORED_LABEL_KEYS]
    differing = [k for k in keys if len({json.dumps(f.get(k, "<missing>"), sort_keys=True, default=str) for f in flats}) > 1]
    if not differing:
        return _unique(list(names), names)
    labels = []
    for f in flats:
        parts = [f"{k}={_label_value(k, f[k]) if k in f else '<missing>'}" for k in differing[:MAX_LABEL_KEYS]]
        if len(differing) > MAX_LABEL_KEYS:
            parts.append(f"+{len(differing) - MAX_LABEL_KEYS} more")
        labels.append(", ".join(parts))
    return _unique(labels, names)


def _label_value(key: str, v) -> str:
    if key in PATH_LABEL_KEYS and isinstance(v, str) and "/" in v.rstrip("/"):
        return Path(v.rstrip("/")).name
    return _fmt(v)


def _unique(labels: list[str], names: list[str]) -> list[str]:
    """Prefix duplicates with their run name so every line can be told apart."""
    out = []
    for label, name in zip(labels, names):
        dup = labels.count(label) > 1
        out.append(f"{name}: {label}" if dup and label != name else label)
    if len(set(out)) < len(out):  # equal names too: number them
        out = [f"{label} [{i}]" for i, label in enumerate(out)]
    return out


def run_names(run_dirs: list[Path]) -> list[str]:
    """Directory names, or the paths as given when two runs share a name."""
    names = [p.name or str(p) for p in run_dirs]
    if len(set(names)) < len(names):
        names = [str(p) for p in run_dirs]
    return names


# ---------------------------------------------------------------- drawing


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, started at the first value; non-finite points are left out of
    the average (and drawn as gaps)."""
    out, acc = [], None
    for v in values:
        if not math.isfinite(v):
            out.append(float("nan"))
            continue
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def _series(rows: list[dict], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if _number(r.get(xkey)) and _number(r.get(ykey)):
            xs.append(r[xkey])
            ys.append(float(r[ykey]))
    return xs, ys


def _with_tokens(rows: list[dict], train: list[dict]) -> list[dict]:
    """Give rows without "tokens" (skipped steps) the tokens of the train row at the same step."""
    tokens_at = {r["step"]: r["tokens"] for r in train if _number(r.get("tokens"))}
    return [r if "tokens" in r or r["step"] not in tokens_at else {**r, "tokens": tokens_at[r["step"]]} for r in rows]


def _val_ppl(rows: list[dict]) -> list[dict]:
    """val_ppl, or exp(val_loss) for rows that lack it."""
    out = []
    for r in rows:
        if not _number(r.get("val_ppl")) and _number(r.get("val_loss")):
            try:
                r = {**r, "val_ppl": math.exp(r["val_loss"])}
            except OverflowError:
                r = {**r, "val_ppl": float("inf")}
        out.append(r)
    return out


def choose_panels(runs: list[RunMetrics]) -> tuple[list[tuple[str, str, str]], str]:
    """(kind, metric, title) of each column, and the figure's note. Runs that used different
    tokenizers are compared in val bits per byte only: their nats per token mean different things."""
    tokenizers = sorted({run_tokenizer(r.config) for r in runs})
    note = ""
    if len(tokenizers) > 1:
        panels = [("train", "loss", "train loss (nats/token, per tokenizer)"), ("val", "val_bpb", "val bits per byte")]
        note = f"the runs used different tokenizers ({', '.join(tokenizers)}): validation in bits per UTF-8 byte"
    else:
        panels = [("train", "loss", "train loss"), ("val", "val_loss", "val loss"), ("val", "val_ppl", "val perplexity")]
        if any(_number(r.get("val_bpb")) for run in runs for r in run.val):
            panels.append(("val", "val_bpb", "val bits per byte"))
    if any(r.hellaswag for r in runs):
        panels.append(("hellaswag", "hellaswag_acc_norm", "HellaSwag acc_norm"))
    if any(r.tasks for r in runs):
        panels.append(("tasks", "tasks_centered", "downstream: mean centered accuracy"))
    return panels, note


def check_format(out: Path, fmt: str) -> None:
    """An image format matplotlib writes, or one line naming the ones it does."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise GPTForgeError(f"plot: {out}: unknown image format {'.' + fmt!r}; supported: png, svg, pdf "
                            f"(and {', '.join(sorted(set(formats) - {'png', 'svg', 'pdf'}))})")


def plot_runs(
    run_dirs: list[str | Path],
    out_png: str | Path,
    smooth: float = 0.0,
    log_scale: bool = False,
    x: str = "both",
) -> Path:
    """Draw the runs' curves into `out_png` (written atomically; the format follows the suffix,
    PNG by default). smooth: EMA factor in [0, 1) for the train loss (0 = raw). log_scale: log y
    for loss and perplexity. x: "both" (rows vs step and vs tokens), "step" or "tokens"."""
    if not run_dirs:
        raise GPTForgeError("plot: give at least one run directory")
    if not (0.0 <= smooth < 1.0):
        raise GPTForgeError(f"plot: smooth must be in [0, 1) (an EMA factor, e.g. 0.9), got {smooth}")
    if x not in X_CHOICES:
        raise GPTForgeError(f"plot: x must be one of {', '.join(X_CHOICES)}, got {x!r}")
    out = Path(out_png)
    fmt = out.suffix.lstrip(".").lower() or "png"
    check_format(out, fmt)
    dirs = [Path(d) for d in run_dirs]
    runs = [read_metrics(d) for d in dirs]
    labels = run_labels([r.config for r in runs], run_names(dirs))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

    xkeys = ["step", "tokens"] if x == "both" else [x]
    panels, note = choose_panels(runs)
    fig = Figure(figsize=(4.6 * len(panels), 3.4 * len(xkeys) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(xkeys), len(panels), squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]

    for row, xkey in enumerate(xkeys):
        for col, (kind, ykey, title) in enumerate(panels):
            ax = axes[row][col]
            for run, label, color in zip(runs, labels, colors):
                rows = _val_ppl(run.val) if ykey == "val_ppl" else getattr(run, kind)
                xs, ys = _series(rows, xkey, ykey)
                if not xs:
                    continue
                if kind == "train":
                    if smooth > 0:
                        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
                        ax.plot(xs, ema(ys, smooth), color=color, linewidth=1.5, label=label)
                    else:
                        ax.plot(xs, ys, color=color, linewidth=1.0, label=label)
                    sx, sy = _series(_with_tokens(run.skipped, run.train), xkey, "loss")
                    if sx:
                        ax.scatter(sx, sy, color=color, marker="x", s=30, zorder=3)
                else:
                    ax.plot(xs, ys, color=color, linewidth=1.2, marker="o", markersize=3, label=label)
            if kind == "hellaswag":
                ax.axhline(GPT2_124M_ACC_NORM, color="0.4", linestyle="--", linewidth=0.8)
                ax.axhline(0.25, color="0.7", linestyle=":", linewidth=0.8)
                ax.annotate("GPT-2 124M", (0.01, GPT2_124M_ACC_NORM), xycoords=("axes fraction", "data"),
                            fontsize=7, color="0.4", va="bottom")
                ax.annotate("chance", (0.01, 0.25), xycoords=("axes fraction", "data"),
                            fontsize=7, color="0.6", va="bottom")
            elif log_scale and ax.has_data():
                ax.set_yscale("log")
                plain = FuncFormatter(lambda v, _: f"{v:g}")  # 3, 4, 6 rather than 3x10^0
                ax.yaxis.set_major_formatter(plain)
                lo, hi = ax.get_ylim()
                # label the minor ticks only when there are few decades (else they overlap)
                ax.yaxis.set_minor_formatter(plain if hi < 10 * lo else NullFormatter())
            ax.set_title(title + ("" if kind != "train" or smooth == 0 else f" (EMA {smooth:g})"), fontsize=10)
            ax.set_xlabel("tokens seen" if xkey == "tokens" else "step")
            if xkey == "tokens":
                ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.grid(True, alpha=0.3)
            if not ax.has_data():
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")

    handles, legend_labels = axes[0][0].get_legend_handles_labels()
    if not handles:  # no train rows anywhere: take the val panel's
        handles, legend_labels = axes[0][1].get_legend_handles_labels()
    longest = max((len(x) for x in legend_labels), default=0)  # long labels: fewer columns, so none runs off the figure
    ncols = min(len(runs), 3 if longest <= 40 else 2 if longest <= 70 else 1)
    # the note (bits per byte across tokenizers) is the legend's title: a suptitle would overlap an outside legend
    fig.legend(handles, legend_labels, loc="outside upper center", ncols=ncols, fontsize=9, frameon=False,
               title=note or None, title_fontsize=10)

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    return out
