"""Device, precision and seeding, decided in one place and reused by train, bench, eval and sample.

(It sits at the bottom of the house rather than in train/: generate and eval need it too, and
nothing may import upward.)
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from gptforge.errors import GPTForgeError

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda if available, else mps, else cpu. A device that is not there is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise GPTForgeError(f"run.device: unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GPTForgeError(f"run.device is {name!r} but CUDA is not available ({cuda_unavailable_reason()}); "
                            "use --run.device cpu")
    return dev


def cuda_unavailable_reason() -> str:
    """Why torch.cuda.is_available() is False here, in torch's own terms: a CPU-only build, the
    warning its CUDA initialization gave (no driver, a driver too old), or no visible device."""
    import warnings

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: torch.version.cuda is None"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
        count = torch.cuda.device_count()
    said = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
    if available and count:
        return "CUDA is available"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {count} GPUs"
    if visible is not None:
        why += f" (CUDA_VISIBLE_DEVICES={visible!r})"
    return why + (f": {said}" if said else ": no NVIDIA driver or device found")


# Models this large are GPU jobs: `run.device auto` stops rather than train one on a CPU. The
# count of GPT-2 124M without its position embedding (model.num_params(non_embedding=True)), so a
# shorter block_size or a padded vocabulary does not move a model across the line.
GPU_SCALE_PARAMS = 123_653_376


def refuse_cpu_fallback(requested: str, device: torch.device, num_params: int) -> None:
    """A model of GPT-2 124M's size or more with `run.device auto` and no GPU found: stop with
    why CUDA is unavailable, rather than start a run of weeks on the CPU. An explicit
    `run.device cpu` trains anyway."""
    if requested == "auto" and device.type == "cpu" and num_params >= GPU_SCALE_PARAMS:
        raise GPTForgeError(
            f"run.device auto found no GPU ({cuda_unavailable_reason()}) for a model of {num_params / 1e6:.0f}M "
            "parameters, which is GPU work; to train it on the CPU anyway, pass --run.device cpu"
        )


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA GPUs that support it; on a CPU, the faster of fp32 and bf16 as the
    matmul probe measured it (`cpu_matmul_rates`: a flag says what a CPU can do, not what is fast
    on it); else fp32. fp16 is only meaningful on CUDA."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        if device.type == "cpu":
            return faster_cpu_precision(cpu_matmul_rates())
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise GPTForgeError("run.precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def precision_reason(device: torch.device) -> str:
    """Why `auto` chose what it chose here, in a few words (with the measured rates on a CPU)."""
    if device.type == "cuda":
        return "auto: bf16 where the GPU supports it"
    if device.type == "cpu":
        rates = cpu_matmul_rates()
        measured = ", ".join(f"{p} {v * 1e3:,.0f}" for p, v in rates.items())
        return f"auto: the faster by the matmul probe, GFLOP/s {measured}" + ("" if "bf16" in rates else " (no bf16 kernels)")
    return "auto"


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def set_matmul_precision(precision: str) -> None:
    """TF32 tensor cores for fp32 matmuls in every mode but pure fp32."""
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision mode: bf16/fp16 autocast, else nothing."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Dense peak FLOP/s (no sparsity) per GPU and dtype, in TFLOP/s: the MFU denominator. From
# NVIDIA's data sheets, whose tensor-core figures are "with sparsity" (halved here). Keys are
# matched as whole words of torch.cuda.get_device_name(), the more specific first (see
# gpu_table_key): "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100
# NVL" are not, and "NVIDIA L40S" is no L4.
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},  # SXM
    "H200 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},  # SXM
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6},
    "V100": {"bf16": 0.0, "fp16": 125.0, "tf32": 15.7, "fp32": 15.7},
    "T4": {"bf16": 0.0, "fp16": 65.0, "tf32": 8.1, "fp32": 8.1},
}


def gpu_table_key(name: str) -> str | None:
    """The GPU_PEAK_TFLOPS entry of a device name, or None. A key matches when each of its words
    is a whole word of the name (case-insensitive; "-" and "_" separate words too); the key with
    the most words wins, so a variant beats its base part."""
    words = set(re.split(r"[\s\-_/()]+", name.lower()))
    hits = [k for k in GPU_PEAK_TFLOPS if all(w in words for w in k.lower().split())]
    return max(hits, key=lambda k: (len(k.split()), len(k))) if hits else None


def gpu_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The table's dense peak of this GPU and precision; None if the GPU is not in it."""
    key = gpu_table_key(torch.cuda.get_device_name(device))
    if key is None:
        return None
    return GPU_PEAK_TFLOPS[key][precision] or None


def measure_matmul_tflops(device: torch.device, precision: str, n: int = 1024, seconds: float = 0.5) -> float:
    """Achievable matmul FLOP/s of this device and dtype, from a short square-matmul probe."""
    dtype = DTYPES[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if device.type != "cpu" and iters % 10 == 0:
            synchronize(device)
    synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def peak_tflops(device: torch.device, precision: str, override: float = 0.0) -> float:
    """The MFU denominator: the peak of the precision in use. An explicit override, else the GPU
    table, else on a CPU the cached probe's best rate over its matmul sizes (tf32 = fp32 there),
    else a probe measurement."""
    if override > 0:
        return override
    if device.type == "cuda":
        known = gpu_peak_tflops(device, precision)
        if known:
            return known
    if device.type == "cpu":
        rates = cpu_matmul_rates()
        key = "fp32" if precision == "tf32" else precision
        if key in rates:
            return rates[key]
    return measure_matmul_tflops(device, precision)


def best_peak_tflops(device: torch.device, override: float = 0.0) -> tuple[float, str]:
    """(TFLOP/s, dtype): the device's best peak over its dtypes, the second MFU denominator that
    shows a run in the slower dtype as such. An override stands for both peaks."""
    if override > 0:
        return override, "given"
    if device.type == "cuda":
        known = {p: gpu_peak_tflops(device, p) for p in ("bf16", "fp16", "tf32", "fp32")}
        known = {p: v for p, v in known.items() if v}
        if known:
            best = max(known, key=known.get)
            return known[best], best
    if device.type == "cpu":
        rates = cpu_matmul_rates()
    else:
        rates = {p: measure_matmul_tflops(device, p) for p in ("fp32", "bf16")}
    best = max(rates, key=rates.get)
    return rates[best], best


# --------------------------------------------------------------------------- the CPU probe
# Matmul shapes (M, K, N) like the model's on a CPU: the tiny preset's attention/MLP projections
# over a 16 x 256 batch, and one larger square (the LM head and wider models reach higher rates).
# The peak of a dtype is its best rate over these; `auto` picks the dtype with the higher peak.
PROBE_SHAPES = ((4096, 384, 1536), (4096, 1536, 384), (2048, 2048, 2048))
PROBE_VERSION = 1
PROBE_BUDGET_S = 0.3  # a second round of the shapes only while the probe is under this


def faster_cpu_precision(rates: dict[str, float]) -> str:
    """bf16 if the probe measured it faster than fp32, else fp32."""
    return "bf16" if rates.get("bf16", 0.0) > rates.get("fp32", 0.0) else "fp32"


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def probe_key() -> dict:
    """What the cached rates depend on: the CPU, torch, the thread count, the probe itself."""
    return {"cpu": cpu_model_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "probe": PROBE_VERSION}


def probe_cache_path(key: dict | None = None):
    import hashlib
    import json

    from gptforge.fsutil import cache_root

    digest = hashlib.sha256(json.dumps(key or probe_key(), sort_keys=True).encode()).hexdigest()[:16]  # a Path
    return cache_root() / "probe" / f"cpu-matmul-{digest}.json"


def measure_cpu_matmul_rates(precisions=("fp32", "bf16"), shapes=PROBE_SHAPES,
                             budget_s: float = PROBE_BUDGET_S) -> dict[str, float]:
    """TFLOP/s per dtype: the fastest single matmul over `shapes`, the dtypes interleaved shape by
    shape (so that a neighbour's burst on a shared machine hurts both alike)."""
    best = {p: 0.0 for p in precisions}
    operands = {}
    for p in precisions:  # first calls (thread pool, oneDNN kernels) outside the timing
        w = torch.randn(256, 256, dtype=DTYPES[p])
        w @ w
    t_start = time.perf_counter()
    for rnd in range(2):
        if rnd and time.perf_counter() - t_start > budget_s:
            break
        for m, k, n in shapes:
            for p in precisions:
                if (m, k, n, p) not in operands:  # constant operands: cheap to make, and no denormals
                    operands[m, k, n, p] = (torch.full((m, k), 0.5, dtype=DTYPES[p]), torch.full((k, n), 0.25, dtype=DTYPES[p]))
                a, b = operands[m, k, n, p]
                t0 = time.perf_counter()
                a @ b
                best[p] = max(best[p], 2 * m * k * n / (time.perf_counter() - t0) / 1e12)
    return best


def cpu_matmul_rates(refresh: bool = False) -> dict[str, float]:
    """{"fp32": TFLOP/s, "bf16": TFLOP/s (where the CPU has bf16 kernels)}: measured once per CPU
    model, torch version and thread count, then read from <gptforge cache>/probe/ (written
    atomically; an unreadable cache file is measured again). `refresh` measures again and keeps
    the higher rate of each dtype: a probe taken while the machine was busy only ever improves."""
    import json

    from gptforge.fsutil import atomic_write_text

    key = probe_key()
    path = probe_cache_path(key)
    cached: dict[str, float] = {}
    try:
        saved = json.loads(open(path).read())
        rates = saved["rates"]
        if saved.get("key") == key and isinstance(rates, dict) and rates.get("fp32", 0) > 0:
            cached = {p: float(v) for p, v in rates.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if cached and not refresh:
        return cached
    precisions = ("fp32", "bf16") if cpu_has_fast_bf16() else ("fp32",)
    t0 = time.perf_counter()
    rates = measure_cpu_matmul_rates(precisions)
    rates = {p: max(v, cached.get(p, 0.0)) for p, v in rates.items()}
    record = {"key": key, "rates": rates, "shapes": [list(s) for s in PROBE_SHAPES],
              "seconds": time.perf_counter() - t0, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    except OSError:  # a read-only cache is no reason to fail a run; it is measured next time too
        pass
    return rates


@dataclass
class Runtime:
    """What a command runs on: resolved once, passed around."""

    device: torch.device
    precision: str
    chosen_by: str = ""  # how `auto` decided, for the banner ("" when the precision was given)

    @classmethod
    def make(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        set_matmul_precision(prec)
        return cls(dev, prec, precision_reason(dev) if precision == "auto" else "")

    def autocast(self):
        return autocast(self.device, self.precision)

    def lm_head_chunks(self, padded_vocab: int) -> tuple[int, int]:
        return lm_head_chunks(self.device, padded_vocab)


# --------------------------------------------------------------------------- the LM-head loss
# The fused LM-head loss (model.LinearCrossEntropy, and the per-token losses of evaluation) goes
# through the rows in chunks: one matmul per chunk, then a few elementwise passes over its
# logits. On a CPU the chunk is 256 MB of fp32 logits (smaller ones cost more in bf16: each adds
# a (V, C) matmul output to the fp32 weight gradient; benchmarks/bench_lm_head.py) and the
# elementwise passes walk it in blocks that stay in cache (8 MB of fp32). On a GPU every op is a kernel launch, so the chunk is large
# (a small share of the GPU's memory, at most 2 GiB of fp32 logits) and is one block: a handful
# of big kernels per micro-batch, never thousands of small ones.
CPU_CHUNK_BYTES = 256 << 20  # fp32 logits per matmul chunk on a CPU
CPU_BLOCK_ELEMENTS = 1 << 21  # logits per elementwise block on a CPU: 8 MB of fp32
GPU_CHUNK_BYTES = 2 << 30  # fp32 logits per chunk on a GPU, at most ...
GPU_CHUNK_SHARE = 32  # ... and at most 1/32 of its memory (a chunk's working set in bf16 is ~2.5x
#                        that: its logits, their fp32 copy and one fp32 temporary)


def lm_head_chunks(device: torch.device, padded_vocab: int) -> tuple[int, int]:
    """(rows per matmul chunk, rows per elementwise block) of the fused LM-head loss here."""
    if device.type == "cuda":
        budget = min(GPU_CHUNK_BYTES, torch.cuda.get_device_properties(device).total_memory // GPU_CHUNK_SHARE)
        rows = max(1, budget // (4 * padded_vocab))
        return rows, rows
    return max(1, CPU_CHUNK_BYTES // (4 * padded_vocab)), max(1, CPU_BLOCK_ELEMENTS // padded_vocab)


# bytes per logit the plain path (logits + F.cross_entropy) holds at its peak under torch.compile:
# the logits in the autocast dtype, their fp32 log-softmax / gradient and the cast gradient
PLAIN_BYTES_PER_LOGIT = 10
PLAIN_MEMORY_SHARE = 4  # the plain path is allowed at most 1/4 of the GPU's memory for it


def choose_lm_head_loss(choice: str, device: torch.device, compiled: bool, rows: int, padded_vocab: int) -> tuple[bool, str]:
    """(fused?, why) for run.lm_head_loss: fused (chunked, no (B, T, V) logits), plain (logits +
    F.cross_entropy) or auto. auto is fused on CPUs (measured faster: the `fused_loss` rung of
    gptforge bench) and on GPUs without compile (the eager plain path holds ~14 bytes per logit);
    on a GPU with compile, whose fusion of the plain path nobody has measured against the fused
    one yet, it is plain while that fits in a quarter of the GPU's memory, else fused."""
    if choice in ("fused", "plain"):
        return choice == "fused", "run.lm_head_loss"
    if device.type != "cuda":
        return True, f"auto: fused on {device.type} (faster there: gptforge bench, rung fused_loss)"
    if not compiled:
        return True, "auto: fused on CUDA without compile (the eager plain path keeps fp32 copies of the logits)"
    need = rows * padded_vocab * PLAIN_BYTES_PER_LOGIT
    total = torch.cuda.get_device_properties(device).total_memory
    if need * PLAIN_MEMORY_SHARE > total:
        return True, (f"auto: fused, the plain path's logits would take ~{need / 2**30:.1f} GiB, over 1/{PLAIN_MEMORY_SHARE} "
                      f"of the GPU's {total / 2**30:.0f} GiB")
    return False, (f"auto: plain under compile (its logits take ~{need / 2**30:.1f} GiB of {total / 2**30:.0f} GiB; "
                   "GPU speed of either path unmeasured: gptforge bench, rung fused_loss)")
