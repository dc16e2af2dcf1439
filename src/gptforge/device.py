"""Device, precision and seeding, decided in one place and reused by train, bench, eval and sample.

What is measured about the machine (the matmul probe, the GPU peak table, the LM-head loss rule)
lives in gptforge.measure, one layer below: `precision auto` on a CPU reads its probe. (This sits
near the bottom of the house rather than in training/: sampling and eval need it too, and
nothing may import upward.)
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from gptforge import measure
from gptforge.errors import GPTForgeError
from gptforge.measure import DTYPES  # noqa: F401  (precision name -> dtype; here for autocast and callers)
from gptforge.measure import synchronize  # noqa: F401  (defined below us: measure times with it too)


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
    matmul probe measured it (`measure.cpu_matmul_rates`: a flag says what a CPU can do, not what
    is fast on it); else fp32. fp16 is only meaningful on CUDA."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        if device.type == "cpu":
            return measure.faster_cpu_precision(measure.cpu_matmul_rates())
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise GPTForgeError("run.precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


def precision_reason(device: torch.device) -> str:
    """Why `auto` chose what it chose here, in a few words (with the measured rates on a CPU)."""
    if device.type == "cuda":
        return "auto: bf16 where the GPU supports it"
    if device.type == "cpu":
        rates = measure.cpu_matmul_rates()
        measured = ", ".join(f"{p} {v * 1e3:,.0f}" for p, v in rates.items())
        return f"auto: the faster by the matmul probe, GFLOP/s {measured}" + ("" if "bf16" in rates else " (no bf16 kernels)")
    return "auto"


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
        return measure.lm_head_chunks(self.device, padded_vocab)
