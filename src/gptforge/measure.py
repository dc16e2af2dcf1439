"""What is measured about the machine, and the decisions that depend on it, in one place.

- the GPU peak table (the MFU denominators on CUDA) and a short matmul probe for other devices;
- the CPU matmul probe, cached per CPU model, torch version and thread count: the MFU
  denominators on a CPU, and the rates by which `precision auto` chooses there (gptforge.device);
- the LM-head loss: its chunk sizes per device and the rule of `run.lm_head_loss auto`.

It sits below gptforge.device (whose `precision auto` reads the probe) and imports only torch
(and gptforge.fsutil, for the probe's cache).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

# precision name -> the dtype of its matmuls (tf32 is fp32 with TF32 tensor cores); the keys of
# the peak table and of the probe (gptforge.device uses it for autocast too)
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (the clock is read only after it); gptforge.device
    re-exports it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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


def matmul_probe(device: torch.device, precisions, shapes, rounds: int = 1,
                 budget_s: float | None = None) -> dict[str, float]:
    """The one matmul probe: TFLOP/s per precision, the fastest single (M, K) x (K, N) matmul over
    `shapes`, synchronized around each. The dtypes are interleaved shape by shape (so that a
    neighbour's burst on a shared machine hurts both alike); every operand pair is used once
    untimed (thread pools, kernels, autotuning); a round after the first runs only while the probe
    is under `budget_s`. Operands are constants: cheap to make, and no denormals."""
    best = {p: 0.0 for p in precisions}
    operands = {}
    t_start = time.perf_counter()
    for rnd in range(rounds):
        if rnd and budget_s is not None and time.perf_counter() - t_start > budget_s:
            break
        for m, k, n in shapes:
            for p in precisions:
                if (m, k, n, p) not in operands:
                    dt = DTYPES[p]
                    a, b = torch.full((m, k), 0.5, dtype=dt, device=device), torch.full((k, n), 0.25, dtype=dt, device=device)
                    operands[m, k, n, p] = (a, b)
                    a @ b
                a, b = operands[m, k, n, p]
                synchronize(device)
                t0 = time.perf_counter()
                a @ b
                synchronize(device)
                best[p] = max(best[p], 2 * m * k * n / (time.perf_counter() - t0) / 1e12)
    return best


def measure_matmul_tflops(device: torch.device, precision: str, n: int = 1024, seconds: float = 0.5) -> float:
    """Achievable matmul FLOP/s of this device and dtype: the probe on n x n squares for about `seconds`."""
    return matmul_probe(device, (precision,), ((n, n, n),), rounds=1 << 20, budget_s=seconds)[precision]


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
    """TFLOP/s per dtype on the CPU: the matmul probe over `shapes`, a second round while under budget."""
    return matmul_probe(torch.device("cpu"), precisions, shapes, rounds=2, budget_s=budget_s)


def cpu_matmul_rates(refresh: bool = False) -> dict[str, float]:
    """{"fp32": TFLOP/s, "bf16": TFLOP/s (where the CPU has bf16 kernels)}: measured once per CPU
    model, torch version and thread count, then read from <gptforge cache>/probe/ (written
    atomically; an unreadable cache file is measured again). `refresh` measures again and keeps
    the higher rate of each dtype: a probe taken while the machine was busy only ever improves."""
    import json

    from gptforge.errors import GPTForgeError
    from gptforge.fsutil import atomic_write_text, read_json

    key = probe_key()
    path = probe_cache_path(key)
    cached: dict[str, float] = {}
    try:
        saved = read_json(path)
        rates = saved["rates"]
        if saved.get("key") == key and isinstance(rates, dict) and rates.get("fp32", 0) > 0:
            cached = {p: float(v) for p, v in rates.items()}
    except (OSError, GPTForgeError, ValueError, KeyError, TypeError, AttributeError):
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
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")  # insertion order: fp32 first
    except OSError:  # a read-only cache is no reason to fail a run; it is measured next time too
        pass
    return rates


# --------------------------------------------------------------------------- the LM-head loss
# The fused LM-head loss (loss.LinearCrossEntropy, and the per-token losses of evaluation) goes
# through the rows in chunks: one matmul per chunk, then the loss and its gradient over the
# chunk's logits. On a CPU the chunk is 256 MB of fp32 logits (smaller ones cost more in bf16:
# each adds a (V, C) matmul output to the fp32 weight gradient; benchmarks/bench_lm_head.py);
# eagerly, the elementwise passes walk it in place in blocks that stay in cache (8 MB of fp32).
# On a GPU every op is a kernel launch, so the chunk is large (a small share of the GPU's memory,
# at most 2 GiB of fp32 logits) and is one block. Under compile each chunk is one compiled graph
# (matmul, loss, gradient, the two gradient matmuls): a few fused kernels per chunk, instead of
# the ~10 elementwise passes of the eager loop.
CPU_CHUNK_BYTES = 256 << 20  # fp32 logits per matmul chunk on a CPU
CPU_BLOCK_ELEMENTS = 1 << 21  # logits per elementwise block on a CPU: 8 MB of fp32
GPU_CHUNK_BYTES = 2 << 30  # fp32 logits per chunk on a GPU, at most ...
GPU_CHUNK_SHARE = 32  # ... and at most 1/32 of its memory (a chunk's working set in bf16 is ~2.5x
#                        that eagerly: its logits, their fp32 copy and one fp32 temporary; compiled,
#                        its logits and their gradient)


def lm_head_chunks(device: torch.device, padded_vocab: int) -> tuple[int, int]:
    """(rows per matmul chunk, rows per elementwise block) of the fused LM-head loss here."""
    if device.type == "cuda":
        budget = min(GPU_CHUNK_BYTES, torch.cuda.get_device_properties(device).total_memory // GPU_CHUNK_SHARE)
        rows = max(1, budget // (4 * padded_vocab))
        return rows, rows
    return max(1, CPU_CHUNK_BYTES // (4 * padded_vocab)), max(1, CPU_BLOCK_ELEMENTS // padded_vocab)


# The plain path under compile holds, at its peak, the logits in the autocast dtype and their
# gradient in the same dtype (Inductor fuses the fp32 cast, the log-softmax and its backward
# into the kernels that read the logits), and the padded gradient the matmul's backward reads:
# about 3 logits' worth. An estimate: with micro-batch auto the trial step measures what fits.
PLAIN_LOGIT_COPIES = 3
PLAIN_MEMORY_SHARE = 4  # the plain path may take at most 1/4 of the GPU's memory ...
PLAIN_MIN_ROWS = 16 * 1024  # ... for a micro-batch of 16k tokens (micro-batch auto), or the given one


@dataclass(frozen=True)
class LMHeadChoice:
    """What `run.lm_head_loss` resolves to on a device: the path, the fused path's chunk sizes,
    whether the loss runs compiled, and why (for the banner)."""

    path: str  # "plain" (logits + cross_entropy) | "fused" (chunked, no (B, T, V) logits)
    rows: int  # rows per matmul chunk of the fused path
    block_rows: int  # rows per elementwise block
    compiled: bool  # the plain cross-entropy / each fused chunk as a compiled graph
    why: str

    @property
    def fused(self) -> bool:
        return self.path == "fused"

    def describe(self) -> str:
        what = f"fused, chunks of {self.rows} rows" if self.fused else "plain"
        return f"{what}{', compiled' if self.compiled else ''} ({self.why})"


def choose_lm_head_loss(choice: str, device: torch.device, compiled: bool, rows: int, padded_vocab: int,
                        precision: str = "bf16", micro_auto: bool = False) -> LMHeadChoice:
    """run.lm_head_loss -> LMHeadChoice. `rows`: the tokens of one micro-batch (with
    `micro_auto`, of the whole per-rank batch, which the trial step then splits with the chosen
    path's memory); `compiled`: run.compile.

    auto:
    - CPU (and MPS): fused, faster there (gptforge bench, rung fused_loss: the plain path's fp32
      copies of the logits are as costly as the head's matmuls); compiled per chunk under
      run.compile on a CPU (measured no slower than the eager in-place blocks, and faster:
      benchmarks/bench_lm_head.py, docs/gpu.md), eager otherwise and on MPS.
    - CUDA with compile: what the fast anchors run (nanoGPT, build-nanogpt: logits and a compiled
      cross-entropy, 64 x 1024 tokens on an 80 GB GPU) whenever its logits fit 1/4 of the GPU's
      memory (for micro-batch auto: those of a 16k-token micro-batch, or of the whole per-rank
      batch when smaller); else fused, each chunk one compiled graph.
    - CUDA without compile: fused, eager (the eager plain path keeps fp32 copies of the logits:
      ~14 bytes a logit).
    The GPU rule is an estimate until a GPU measures it: gptforge bench's `fused_adamw` rung
    (plain, compiled) against its `fused_loss` rung (fused, compiled chunks)."""
    chunk_rows, block_rows = lm_head_chunks(device, padded_vocab)
    on_cuda = device.type == "cuda"
    run_compiled = compiled and device.type in ("cuda", "cpu")  # where run.compile compiles the model

    def made(path: str, why: str) -> LMHeadChoice:
        return LMHeadChoice(path, chunk_rows, block_rows, run_compiled, why)

    if choice in ("fused", "plain"):
        return made(choice, "run.lm_head_loss")
    if not on_cuda:
        return made("fused", f"auto: fused on {device.type} (faster there: gptforge bench, rung fused_loss)")
    if not compiled:
        return made("fused", "auto: fused on CUDA without compile (the eager plain path keeps fp32 copies of the logits)")
    judged = min(rows, PLAIN_MIN_ROWS) if micro_auto else rows
    logit_bytes = DTYPES[precision].itemsize if precision in DTYPES else 4
    need = judged * padded_vocab * logit_bytes * PLAIN_LOGIT_COPIES
    total = torch.cuda.get_device_properties(device).total_memory
    of = f"{judged:,} tokens' logits would take ~{need / 2**30:.1f} GiB"
    if need * PLAIN_MEMORY_SHARE > total:
        return made("fused", f"auto: fused, compiled per chunk; the plain path's {of}, over 1/{PLAIN_MEMORY_SHARE} "
                             f"of the GPU's {total / 2**30:.0f} GiB")
    return made("plain", f"auto: plain with a compiled cross-entropy, as nanoGPT; its {of} of {total / 2**30:.0f} GiB "
                         "(unmeasured on a GPU against fused: gptforge bench, rungs fused_adamw and fused_loss)")
