"""The seed's speed ladder: the same model and batch, each rung adding one thing.

    fp32 -> tf32 -> bf16 autocast -> + flash attention -> + vocab padded to 50304
         -> + torch.compile -> + fused AdamW -> + fused LM-head loss

Every rung builds a `Trainer` with that rung's config over a synthetic shard directory of random
tokens (written once with the data package's shard writer) and times `Trainer.train_step()`: the
real step (loader, autocast, forward, loss, backward, clip, optimizer), not a copy of it.

Honest timing: the trainer synchronizes the device around each step; warm-up steps (where
torch.compile compiles) are excluded and the compile time is reported apart. A rung that means
nothing on the device (TF32 on a CPU, bf16 on a GPU without it, compile without a compiler) is
reported as n/a with the reason, and later rungs build on the last rung that ran.

MFU has the trainer's two definitions (docs/performance.md): `mfu` against the peak of the rung's own
precision, `mfu_best` against the device's best peak over its dtypes. The peaks are the GPU table,
else on a CPU the cached matmul probe that `precision auto` also decides by (both rates shown).
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from gptforge import __version__
from gptforge import config as C
from gptforge.device import resolve_device
from gptforge.errors import GPTForgeError
from gptforge.measure import cpu_has_fast_bf16, cpu_model_name, gpu_peak_tflops
from gptforge.model import PRESETS, preset


@dataclass(frozen=True)
class Rung:
    name: str
    adds: str  # what this rung adds to the one before
    overrides: dict  # config keys it sets


# The base every rung starts from; each rung then adds its overrides on top of those before it.
BASE = {"run.precision": "fp32", "model.attention": "manual", "model.pad_vocab": "false",
        "run.compile": "false", "optim.fused": "off", "run.lm_head_loss": "plain"}
LADDER = (
    Rung("fp32", "fp32, manual attention, vocab 50257, eager, for-each AdamW", {}),
    Rung("tf32", "TF32 matmuls", {"run.precision": "tf32"}),
    Rung("bf16", "bf16 autocast", {"run.precision": "bf16"}),
    Rung("flash", "flash attention (scaled_dot_product_attention)", {"model.attention": "flash"}),
    Rung("pad_vocab", "vocabulary padded 50257 -> 50304", {"model.pad_vocab": "true"}),
    Rung("compile", "torch.compile", {"run.compile": "true"}),
    Rung("fused_adamw", "fused AdamW", {"optim.fused": "on"}),
    # the rung that decides run.lm_head_loss auto (measure.choose_lm_head_loss): chunked LM head +
    # loss, no (B, T, V) logits, against the plain logits + cross_entropy of every rung before;
    # on CUDA both compiled from the compile rung on (the plain cross-entropy; each fused chunk)
    Rung("fused_loss", "fused LM-head loss (chunked rows, no (B, T, V) logits)", {"run.lm_head_loss": "fused"}),
)


@dataclass
class BenchArgs:
    preset: str = ""  # empty: gpt2 on CUDA, tiny elsewhere
    arch: str = "gpt2"  # model.arch: gpt2 | modern
    batch: int = 0  # micro-batch B; 0: 16 on CUDA, 4 elsewhere
    seq_len: int = 0  # T; 0: the preset's block_size
    steps: int = 0  # timed steps per rung; 0: 10 on CUDA, 3 elsewhere
    warmup: int = -1  # untimed steps per rung (at least 1 for compile); -1: 3 on CUDA, 1 elsewhere
    device: str = "auto"
    out: str = "bench"
    peak_tflops: float = 0.0  # MFU denominator; 0: table / probe
    skip: tuple[str, ...] = ()  # rungs to report as n/a without running them
    threads: int = 0  # torch CPU threads; 0: torch's default


@dataclass
class RungResult:
    name: str
    adds: str
    status: str = "ok"  # ok | n/a
    reason: str = ""  # why n/a, or a note on an ok rung
    tokens_per_s: float | None = None
    step_ms: float | None = None  # median of the timed steps
    mfu: float | None = None  # of the peak of this rung's precision
    mfu_best: float | None = None  # of the device's best peak over dtypes
    peak_mem_mb: float | None = None
    speedup: float | None = None  # tokens/s over the fp32 rung's
    compile_s: float | None = None  # first step's extra time on the compile rungs
    warmup_s: float | None = None  # wall time of the untimed steps
    loss: float | None = None  # the last step's loss, as a sanity check
    lm_head: str = ""  # the LM-head loss the rung ran (path, compiled or not, why): the trainer's banner line
    config: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- applicability
def not_applicable(rung: Rung, device: torch.device) -> str | None:
    """Why a rung means nothing on this device, or None."""
    if rung.name == "tf32":
        if device.type != "cuda":
            return f"TF32 is a CUDA tensor-core mode; fp32 matmuls on {device.type} are unchanged by it"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "TF32 needs an Ampere or newer GPU"
    if rung.name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if rung.name == "compile":
        if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
            return "torch.compile on CPU needs a C++ compiler (none found)"
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                return "torch.compile on CUDA needs triton (not installed)"
        if device.type not in ("cpu", "cuda"):
            return f"torch.compile is not benchmarked on {device.type}"
    if rung.name == "fused_adamw":
        if "fused" not in inspect.signature(torch.optim.AdamW).parameters or device.type not in ("cpu", "cuda", "mps"):
            return f"no fused AdamW for {device.type} in torch {torch.__version__}"
    return None


def note(rung: Rung, device: torch.device) -> str:
    """A caveat on a rung that still runs."""
    if rung.name == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        return "this CPU has no native bf16 (emulated)"
    return ""


def matmul_peak(device: torch.device, precision: str, sizes=(1024, 2048, 4096), reps: int = 3) -> float:
    """The dtype's achievable dense peak here, in TFLOP/s: the fastest of a few square matmuls
    (measure.matmul_probe: each size warmed up once, then timed `reps` times, synchronized)."""
    from gptforge.device import set_matmul_precision
    from gptforge.measure import matmul_probe

    set_matmul_precision(precision)  # TF32 on for tf32 (and the autocast modes), off for fp32
    return matmul_probe(device, (precision,), [(n, n, n) for n in sizes], rounds=reps)[precision]


def mfu_peak(device: torch.device, override: float = 0.0) -> tuple[float, str]:
    """(TFLOP/s, how it was obtained): the best dense matmul peak of the device over its dtypes
    (the `mfu_best` denominator; the same function the trainer uses)."""
    from gptforge.measure import best_peak_tflops

    if override > 0:
        return override, "given by --peak-tflops"
    peak, dtype = best_peak_tflops(device)
    if device.type == "cuda" and gpu_peak_tflops(device, dtype):
        return peak, f"{dtype} peak of {torch.cuda.get_device_name(device)} (table)"
    if device.type == "cpu":
        return peak, f"{dtype}, the faster dtype of the matmul probe (cached; the one precision auto decides by)"
    return peak, f"{dtype} matmul peak measured here"


def dtype_peaks(device: torch.device, override: float = 0.0) -> dict[str, float]:
    """TFLOP/s per precision the device runs: each rung's `mfu` denominator (the trainer's too)."""
    from gptforge.measure import peak_tflops

    names = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    if device.type == "cpu" and not override:
        from gptforge.measure import cpu_matmul_rates

        names = list(cpu_matmul_rates())
    return {p: peak_tflops(device, p, override) for p in names}


# --------------------------------------------------------------------------- data
def write_random_shards(out: Path, train_tokens: int, val_tokens: int, vocab_size: int = 50257, seed: int = 0) -> Path:
    """A prepared-data directory of uniformly random tokens (train and val splits)."""
    from gptforge.data import shards

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = shards.token_dtype(vocab_size)
    eot = vocab_size - 1
    splits = {}
    for split, n in (("val", val_tokens), ("train", train_tokens)):
        tokens = rng.integers(0, vocab_size, size=n, dtype=np.int64)
        entry = shards.write_shard(out / shards.shard_name(split, 0), [tokens], n, dtype, eot)
        splits[split] = {"num_tokens": n, "num_documents": entry["num_documents"], "shards": [entry]}
    shards.write_manifest(out, {
        "format": shards.FORMAT, "version": shards.VERSION, "tokenizer": "gpt2", "vocab_size": vocab_size,
        "eot_id": eot, "dtype": dtype.name, "shard_tokens": max(train_tokens, val_tokens), "splits": splits,
        "documents": {}, "sources": ["random tokens (gptforge bench)"], "options": {"synthetic": True, "seed": seed},
    })
    return out


# --------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a rung: CUDA max_memory_allocated, else the growth of this process's RSS
    over its value at the start (sampled every few ms by a thread)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        _trim_heap()
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20 if self.device.type != "cuda" else self.peak / 2**20


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so an RSS baseline is not inflated."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- the ladder
def rung_config(overrides: dict, args: BenchArgs, data_dir: Path, run_dir: Path, peak: float) -> C.TrainConfig:
    B, T = args.batch, args.seq_len
    keys = {
        "model.preset": args.preset, "model.arch": args.arch, "data.dir": str(data_dir), "data.seq_len": T, "data.order": "sequential",
        "data.prefetch": 0, "optim.batch_tokens": B * T, "optim.micro_batch_size": B, "optim.warmup_steps": 1,
        "run.dir": str(run_dir), "run.max_steps": args.warmup + args.steps, "run.device": args.device,
        "run.eval_every": 0, "run.ckpt_every": 0, "run.peak_tflops": args.peak_tflops, "run.log": "none",
        **BASE, **overrides,
    }
    return C.resolve(None, [(k, str(v)) for k, v in keys.items()])


def run_rung(cfg: C.TrainConfig, args: BenchArgs, device: torch.device, warmup: int) -> RungResult:
    from gptforge.training.trainer import Trainer

    res = RungResult("", "")
    with PeakMemory(device) as mem:
        trainer = Trainer(cfg, progress=False)
        try:
            t0 = time.perf_counter()
            first = None
            for i in range(warmup):
                trainer.train_step()
                if i == 0:
                    first = time.perf_counter() - t0
            res.warmup_s = time.perf_counter() - t0
            rows = [trainer.train_step() for _ in range(args.steps)]
        finally:
            trainer.report.close()
            trainer.loader.close()
            trainer.val_loader.close()
    dt = statistics.median(r["dt_ms"] for r in rows)  # robust to a neighbour's burst on a shared machine
    res.step_ms = dt
    res.tokens_per_s = trainer.plan.batch_tokens / (dt / 1000)
    res.mfu = trainer.flops_per_token * res.tokens_per_s / trainer.peak
    res.mfu_best = trainer.flops_per_token * res.tokens_per_s / trainer.best_peak
    res.peak_mem_mb = mem.megabytes
    res.loss = rows[-1]["loss"]
    res.lm_head = trainer.head_choice.describe()
    if cfg.run.compile and first is not None:
        res.compile_s = max(0.0, first - dt / 1000)
    del trainer
    return res


def resolve_args(args: BenchArgs) -> tuple[BenchArgs, torch.device]:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    a = BenchArgs(**{**asdict(args), "skip": tuple(args.skip)})
    a.device = str(device)
    a.preset = a.preset or ("gpt2" if cuda else "tiny")
    if a.preset not in PRESETS:
        raise GPTForgeError(f"--model.preset: unknown preset {a.preset!r}; known: {', '.join(PRESETS)}")
    block = preset(a.preset).block_size
    a.batch = a.batch or (16 if cuda else 4)
    a.seq_len = a.seq_len or block
    a.steps = a.steps or (10 if cuda else 3)
    a.warmup = a.warmup if a.warmup >= 0 else (3 if cuda else 1)
    problems = []
    if a.batch < 1 or a.steps < 1 or a.threads < 0:
        problems.append(f"--batch and --steps must be >= 1 and --threads >= 0, got {a.batch}, {a.steps}, {a.threads}")
    if not 1 <= a.seq_len <= block:
        problems.append(f"--seq-len must be in [1, {block}] (the preset's block_size), got {a.seq_len}")
    unknown = sorted(set(a.skip) - {r.name for r in LADDER})
    if unknown:
        problems.append(f"--skip: unknown rungs {unknown}; rungs: {', '.join(r.name for r in LADDER)}")
    if problems:
        raise GPTForgeError("; ".join(problems))
    return a, device


def run_ladder(args: BenchArgs, echo=print) -> dict:
    """Run every rung; return the report (also what bench.json holds)."""
    args, device = resolve_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not args.peak_tflops:
        from gptforge.measure import cpu_matmul_rates

        cpu_matmul_rates(refresh=True)  # bench is where a machine is measured: the probe again, cached for train too
    peak, peak_how = mfu_peak(device, args.peak_tflops)
    peaks = dtype_peaks(device, args.peak_tflops)
    echo("matmul peaks (TFLOP/s): " + ", ".join(f"{p} {v:.3f}" for p, v in peaks.items()) + f"; best: {peak_how}")
    results: list[RungResult] = []
    applied: dict = {}
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as tmp:
        # enough windows for every step of a rung, plus a small val split the trainer opens
        n_train = (args.warmup + args.steps + 2) * args.batch * (args.seq_len + 1) + 1
        data_dir = write_random_shards(Path(tmp) / "data", n_train, 2 * args.batch * (args.seq_len + 1) + 1)
        for rung in LADDER:
            res = RungResult(rung.name, rung.adds)
            why = "skipped with --skip" if rung.name in args.skip else not_applicable(rung, device)
            if why:
                res.status, res.reason = "n/a", why
                results.append(res)
                echo(f"{rung.name:<12} n/a: {why}")
                continue
            overrides = {**applied, **rung.overrides}
            cfg = rung_config(overrides, args, data_dir, Path(tmp) / "runs" / rung.name, peak)
            warmup = max(args.warmup, 1) if cfg.run.compile else args.warmup
            try:
                timed = run_rung(cfg, args, device, warmup)
            except GPTForgeError:
                raise
            except Exception as e:  # a rung that cannot run here (a compiler error, say): n/a, said why
                if rung.name not in ("compile", "fused_adamw", "fused_loss"):
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                res.status, res.reason = "n/a", f"failed on this machine: {type(e).__name__}: {first[:200]}"
                results.append(res)
                echo(f"{rung.name:<12} n/a: {res.reason}")
                continue
            finally:
                if cfg.run.compile:
                    torch._dynamo.reset()
            applied = overrides
            timed.name, timed.adds, timed.reason = rung.name, rung.adds, note(rung, device)
            timed.config = {k: overrides.get(k, v) for k, v in BASE.items()}
            results.append(timed)
            echo(f"{rung.name:<12} {timed.tokens_per_s:>12,.0f} tok/s  {timed.step_ms:>9.1f} ms/step")
    base = next((r for r in results if r.name == "fp32" and r.status == "ok"), None)
    for r in results:
        if r.status == "ok" and base is not None:
            r.speedup = r.tokens_per_s / base.tokens_per_s
    return {
        "gptforge": __version__, "torch": torch.__version__, "device": str(device), "device_name": device_name(device),
        "preset": args.preset, "arch": args.arch, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": args.batch * args.seq_len,
        "steps": args.steps, "warmup": args.warmup, "peak_tflops": peak, "peak_source": peak_how, "peaks_tflops": peaks,
        "memory": "CUDA max_memory_allocated" if device.type == "cuda" else "growth of process RSS (psutil)",
        "rungs": [asdict(r) for r in results],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model_name()}, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------- output
def _f(v, fmt: str, width: int) -> str:
    return f"{'n/a':>{width}}" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:>{width}{fmt}}"


def format_table(report: dict) -> str:
    head = (f"gptforge bench | {report['device']} ({report['device_name']}) | torch {report['torch']} | "
            f"model {report['preset']} | B={report['batch']} T={report['seq_len']} | "
            f"{report['steps']} timed steps after {report['warmup']} warm-up")
    cols = (f"{'rung':<12} {'tokens/s':>12} {'step ms':>10} {'MFU':>7} {'MFU best':>9} {'peak MB':>9} {'speedup':>8}"
            f" {'compile s':>10}  notes")
    lines = [head, cols, "-" * len(cols)]
    for r in report["rungs"]:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<12} {'n/a':>12} {'':>10} {'':>7} {'':>9} {'':>9} {'':>8} {'':>10}  {r['reason']}")
            continue
        mfu = None if r["mfu"] is None else r["mfu"] * 100
        best = None if r.get("mfu_best") is None else r["mfu_best"] * 100
        lines.append(
            f"{r['name']:<12} {_f(r['tokens_per_s'], ',.0f', 12)} {_f(r['step_ms'], '.1f', 10)} {_f(mfu, '.1f', 6)}%"
            f" {_f(best, '.1f', 8)}%"
            f" {_f(r['peak_mem_mb'], '.0f', 9)} {_f(r['speedup'], '.2f', 7)}{'x' if r['speedup'] else ' '} {_f(r['compile_s'], '.1f', 10)}  {r['reason']}"
        )
    peaks = ", ".join(f"{p} {v:.3f}" for p, v in report.get("peaks_tflops", {}).items())
    lines.append(f"MFU: of the peak of the rung's precision ({peaks} TFLOP/s); MFU best: of the device's best, "
                 f"{report['peak_tflops']:.3f} TFLOP/s ({report['peak_source']}); peak memory: {report['memory']}")
    return "\n".join(lines)


def write_outputs(report: dict, out: str | Path) -> tuple[Path, Path]:
    """bench.json and bench.png (tokens/s per rung) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "bench.json", out / "bench.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
    return json_path, png_path


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = report["rungs"]
    names = [r["name"] for r in rungs]
    values = [r["tokens_per_s"] if r["status"] == "ok" else 0.0 for r in rungs]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rungs) + 1.6))
    y = list(range(len(rungs)))[::-1]
    bars = ax.barh(y, values, color=["#4c72b0" if r["status"] == "ok" else "#cccccc" for r in rungs])
    top = max(values) if any(values) else 1.0
    for yi, r, bar in zip(y, rungs, bars):
        if r["status"] == "ok":
            label = f"{r['tokens_per_s']:,.0f}" + (f"  ({r['speedup']:.2f}x)" if r["speedup"] else "")
        else:
            label = "n/a: " + (r["reason"] if len(r["reason"]) <= 60 else r["reason"][:57] + "...")
        ax.text(bar.get_width() + top * 0.01, yi, label, va="center", fontsize=9,
                color="black" if r["status"] == "ok" else "#777777")
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    ax.set_xlim(0, top * 1.3)
    ax.set_xlabel("tokens / s (higher is better)")
    ax.set_title(f"gptforge bench: {report['preset']}, B={report['batch']}, T={report['seq_len']}\n"
                 f"{report['device']} ({report['device_name']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
