"""Run configuration: typed dataclasses, filled from defaults, then a TOML file, then the command line.

Sections: `model` (which architecture: a preset plus overrides), `data`, `optim`, `run`.
The architecture itself is `gptforge.model.GPTConfig`; `ModelArgs.gpt_config()` resolves it, and
ModelArgs's switch keys are GPTConfig's switch fields.
Unknown keys and wrong types are errors that list the valid keys. Each field's help (`arg(default,
help)`, kept in the field's metadata) becomes the CLI help of `gptforge train --help`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gptforge.errors import GPTForgeError
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("auto", "cosine", "wsd")
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # what torch.optim.Muon's adjust_lr_fn accepts


def arg(default, help: str):
    """A config field with its help text (shown by `gptforge train --help`)."""
    return field(default=default, metadata={"help": help})


# --- the model section: its switches are GPTConfig's (gptforge.model), derived, never listed here ---
from gptforge.model import PRESETS, RECIPES, SWITCHES, GPTConfig, preset  # noqa: E402


@dataclass
class _ModelKeys:
    preset: str = arg("mini", "named size: nano, mini, tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    n_layer: int | None = arg(None, "override the preset's number of blocks")
    n_head: int | None = arg(None, "override the preset's number of heads")
    n_embd: int | None = arg(None, "override the preset's width")
    block_size: int | None = arg(None, "override the preset's context length")
    dropout: float = arg(0.0, "dropout in attention, residual and embedding paths")
    attention: str = arg("flash", "flash (scaled_dot_product_attention) | manual (explicit mask)")
    pad_vocab: bool = arg(False, "pad the vocabulary 50257 -> 50304 for faster matmuls")
    init_from: str = arg("", "start from these weights (fresh optimizer, step 0): gpt2 ... gpt2-xl, an HF GPT-2 dir, a gptforge checkpoint or run dir; the architecture is theirs")
    arch: str = arg("modern", "the recipe the switches below start from: gpt2 (GPT-2 exactly) | modern (RoPE, QK-norm, RMSNorm, SwiGLU, untied head, zero-init); the presets size both")

    def gpt_config(self, vocab_size: int = 50257) -> GPTConfig:
        """The architecture these keys describe: the preset's size, model.arch's switches, the overrides."""
        sizes = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k) is not None}
        switches = {k: getattr(self, k) for k in SWITCHES if getattr(self, k) is not None}
        return preset(self.preset, self.arch, vocab_size=vocab_size, dropout=self.dropout, attention=self.attention,
                      pad_vocab=self.pad_vocab, **sizes, **switches)


def _switch_key(f: dataclasses.Field) -> tuple[str, object, dataclasses.Field]:
    """model.<switch>: unset (None) = model.arch's value; the help is the model config's."""
    recipes = ", ".join(f"{name} {values[f.name]}" for name, values in RECIPES.items())
    tp = typing.get_type_hints(GPTConfig)[f.name]
    return f.name, tp | None, arg(None, f"{f.metadata['help']} (default: model.arch's: {recipes})")


ModelArgs = dataclasses.make_dataclass(
    "ModelArgs", [_switch_key(f) for f in fields(GPTConfig) if f.name in SWITCHES], bases=(_ModelKeys,),
    namespace={"__module__": __name__, "__doc__": "The `model` section: a size preset, a recipe and its switches."})
MODERN_KEYS = SWITCHES  # deprecated name: every switch applies to every recipe


@dataclass
class DataArgs:
    dir: str = arg("", "directory of prepared shards; empty = the embedded python-stdlib corpus (prepared on first use)")
    tokenizer: str = arg("train:4096", "the embedded corpus's tokenizer (data.dir empty): gpt2 | train:N (an N-id BPE trained on it, cached); data.dir's is the one it was prepared with")
    seq_len: int = arg(0, "tokens per sequence T; 0 = the model's block_size")
    order: str = arg("shuffle", "shuffle (seeded permutation of windows each epoch) | sequential")
    prefetch: int = arg(2, "batches prepared ahead in a background thread (0 = off)")
    verify: bool = arg(True, "sha256 of every shard against manifest.json before the first step (remembered; off = start at once)")


@dataclass
class OptimArgs:
    batch_tokens: int = arg(4096, "tokens per optimizer step across all ranks and micro-steps")
    micro_batch_size: int = arg(0, "sequences per forward/backward on one rank; auto (or 0) = the largest that divides the batch and fits the device")
    lr: float = arg(2e-3, "peak learning rate (AdamW; under muon, of the embeddings, head and gains); the default by benchmarks/modern_recipe.py")
    min_lr_ratio: float = arg(0.1, "final LR = lr * min_lr_ratio after the decay (cosine or WSD's linear)")
    warmup_steps: int = arg(20, "linear warmup steps")
    decay_steps: int = arg(0, "the decay ends here; 0 = run.max_steps")
    schedule: str = arg("auto", "auto (wsd for model.arch modern, cosine for gpt2: each measured with its arch) | cosine (warmup, then cosine decay) | wsd (warmup, flat, then linear decay over the last decay_frac of the steps)")
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


@dataclass
class RunArgs:
    dir: str = arg("runs/default", "run directory: config, metrics.jsonl, checkpoints/")
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
    max_minutes: float = arg(0.0, "stop (and checkpoint) after this much wall time; 0 = no limit")
    lm_head_loss: str = arg("auto", "auto | fused (chunked: no (B, T, V) logits) | plain (logits + cross_entropy); see measure.choose_lm_head_loss")


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
AUTO_ZERO = {"optim.micro_batch_size"}  # int keys where the word "auto" means 0


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
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
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


def packaged_configs() -> dict[str, Path]:
    """name -> path of the TOML recipes shipped in the package (gptforge/configs/*.toml)."""
    import importlib.resources

    root = importlib.resources.files("gptforge") / "configs"
    return {f.name[: -len(".toml")]: Path(str(f)) for f in root.iterdir() if f.name.endswith(".toml")}


def packaged_config(spec: str | Path) -> Path:
    """The config file `--config` names: a path that exists wins; else a packaged config by name
    (`gpt2-124m` or `gpt2-124m.toml`), from any directory; else one error listing those names."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    packaged = packaged_configs()
    name = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
    if name in packaged and str(spec) in (name, f"{name}.toml"):
        return packaged[name]
    hint = f" (a packaged config is named so: --config {name})" if name in packaged else ""
    raise GPTForgeError(f"--config {spec}: no such file{hint}; expected a TOML path or a packaged config: "
                        f"{', '.join(sorted(packaged))}")


def load_toml(path: str | Path) -> dict:
    """The tables of a config file: a path, or a packaged config's name (see packaged_config)."""
    path = packaged_config(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: config file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise GPTForgeError(f"{path}: not valid TOML ({e})") from e


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """['--run.max_steps', '10', '--optim.lr=3e-4'] -> [('run.max_steps', '10'), ('optim.lr', '3e-4')]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise GPTForgeError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise GPTForgeError(f"{arg} needs a value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        out.append((key, value))
    return out


def resolve(config_file: str | Path | None = None, overrides: list[tuple[str, str]] | None = None) -> TrainConfig:
    """Defaults -> TOML file -> overrides, then validate."""
    cfg = TrainConfig()
    if config_file:
        apply_dict(cfg, load_toml(config_file), str(config_file))
    for key, value in overrides or []:
        set_value(cfg, key, value, f"--{key}")
    try:
        return cfg.validate()
    except GPTForgeError as e:
        if config_file:  # name where the values came from
            raise GPTForgeError(f"{config_file} (with command-line overrides): {e}") from None
        raise


def validate(cfg: TrainConfig) -> None:
    """Check every field together; one error listing every problem."""
    p: list[str] = []
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    if m.preset not in PRESETS:
        p.append(f"model.preset: unknown preset {m.preset!r}; known: {', '.join(PRESETS)}")
    else:
        try:
            m.gpt_config()
        except GPTForgeError as e:
            p.append(str(e))
    if o.batch_tokens <= 0:
        p.append(f"optim.batch_tokens must be > 0, got {o.batch_tokens}")
    if o.micro_batch_size < 0:
        p.append(f"optim.micro_batch_size must be > 0, or auto (0), got {o.micro_batch_size}")
    for name in ("max_steps", "keep_last", "log_every"):
        if getattr(r, name) <= 0:
            p.append(f"run.{name} must be > 0, got {getattr(r, name)}")
    for sec, name in (("run", "eval_every"), ("run", "ckpt_every"), ("run", "sample_every"), ("run", "sample_tokens"),
                      ("run", "eval_tokens"), ("run", "hellaswag_every"), ("optim", "warmup_steps"), ("optim", "decay_steps"),
                      ("data", "seq_len"), ("data", "prefetch")):
        if getattr(getattr(cfg, sec), name) < 0:
            p.append(f"{sec}.{name} must be >= 0, got {getattr(getattr(cfg, sec), name)}")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        p.append(f"optim.lr must be a positive number, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.weight_decay < 0 or o.grad_clip < 0 or o.eps <= 0:
        p.append("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        p.append(f"optim.beta1/beta2 must be in [0, 1), got {o.beta1}, {o.beta2}")
    if o.name not in ("auto", *OPTIMIZERS):
        p.append(f"optim.name must be one of auto, {', '.join(OPTIMIZERS)}, got {o.name!r}")
    elif not m.init_from and (refusal := refuse_fsdp_muon(cfg)):  # with init_from: the source's arch (trainer)
        p.append(refusal)
    if o.schedule not in SCHEDULES:
        p.append(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    if not 0 <= o.decay_frac <= 1:
        p.append(f"optim.decay_frac must be in [0, 1], got {o.decay_frac}")
    if not (o.muon_lr > 0 and math.isfinite(o.muon_lr)):
        p.append(f"optim.muon_lr must be a positive number, got {o.muon_lr}")
    for name in ("embed_lr", "head_lr", "muon_weight_decay"):
        value = getattr(o, name)
        if not (value >= 0 and math.isfinite(value)):
            p.append(f"optim.{name} must be a number >= 0{' (0 = optim.lr)' if name.endswith('_lr') else ''}, got {value}")
    if not 0 <= o.muon_momentum < 1:
        p.append(f"optim.muon_momentum must be in [0, 1), got {o.muon_momentum}")
    if o.muon_adjust_lr not in MUON_ADJUST_LR:
        p.append(f"optim.muon_adjust_lr must be one of {', '.join(MUON_ADJUST_LR)}, got {o.muon_adjust_lr!r}")
    if o.fused not in ("auto", "on", "off"):
        p.append(f"optim.fused must be auto, on or off, got {o.fused!r}")
    if o.spike_k <= 0 or o.spike_window < 2 or o.spike_max_skips < 1 or not 0 < o.spike_lr_factor <= 1:
        p.append("optim.spike_k > 0, optim.spike_window >= 2, optim.spike_max_skips >= 1, optim.spike_lr_factor in (0, 1]")
    if d.tokenizer != "gpt2" and not (d.tokenizer.startswith("train:") and d.tokenizer[6:].isdigit()
                                      and 257 <= int(d.tokenizer[6:]) <= 1 << 32):
        p.append(f"data.tokenizer must be gpt2 or train:N with N from 257 to 4,294,967,296, got {d.tokenizer!r}")
    if d.order not in ("shuffle", "sequential"):
        p.append(f"data.order must be shuffle or sequential, got {d.order!r}")
    if r.precision not in PRECISIONS + ("auto",):
        p.append(f"run.precision must be one of {', '.join(PRECISIONS + ('auto',))}, got {r.precision!r}")
    if r.log not in ("none", "wandb", "tensorboard"):
        p.append(f"run.log must be none, wandb or tensorboard, got {r.log!r}")
    if r.lm_head_loss not in ("auto", "fused", "plain"):
        p.append(f"run.lm_head_loss must be auto, fused or plain, got {r.lm_head_loss!r}")
    if r.dist not in ("ddp", "fsdp"):
        p.append(f"run.dist must be ddp or fsdp, got {r.dist!r}")
    if not r.dir:
        p.append("run.dir must not be empty")
    if r.peak_tflops < 0 or r.max_minutes < 0:
        p.append("run.peak_tflops and run.max_minutes must be >= 0")
    if not p and m.preset in PRESETS and not m.init_from:  # with init_from, checked against the source's
        block = m.gpt_config().block_size
        if d.seq_len > block:
            p.append(f"data.seq_len ({d.seq_len}) exceeds the model's block_size ({block})")
    if p:
        raise GPTForgeError("invalid config: " + "; ".join(p))


def optimizer_name(cfg: TrainConfig, arch: str | None = None) -> str:
    """The optimizer this run uses: optim.name, where `auto` is the architecture's own (Muon for
    the modern recipe, whose defaults were measured with it; AdamW for GPT-2, as in 2019). `arch`:
    the model's as built (with model.init_from it is the source's, which the config may not say)."""
    return _by_arch(cfg.optim.name, cfg, arch, modern="muon", gpt2="adamw")


def schedule_name(cfg: TrainConfig, arch: str | None = None) -> str:
    """The LR schedule this run uses: optim.schedule, where `auto` is the architecture's own (WSD
    for the modern recipe: ~0.03 lower val bpb than cosine at 150 steps on two seeds,
    benchmarks/modern_recipe.py; cosine for GPT-2, with which benchmarks/sweep_lr.py chose its LR).
    `arch` as in optimizer_name."""
    return _by_arch(cfg.optim.schedule, cfg, arch, modern="wsd", gpt2="cosine")


def _by_arch(value: str, cfg: TrainConfig, arch: str | None, modern: str, gpt2: str) -> str:
    """`value`, or for `auto` the architecture's own choice (arch: the built model's, else the config's)."""
    if value != "auto":
        return value
    return modern if (arch or cfg.model.arch) == "modern" else gpt2


def refuse_fsdp_muon(cfg: TrainConfig, arch: str | None = None) -> str | None:
    """The one-line reason Muon cannot run under this run's FSDP2, or None."""
    if optimizer_name(cfg, arch) == "muon" and cfg.run.dist == "fsdp":
        how = "" if cfg.optim.name == "muon" else " (optim.name auto chose it for model.arch modern)"
        return (f"optim.name muon{how} does not run under run.dist fsdp (Muon orthogonalizes whole matrices and "
                "an FSDP2 shard is not one): use --run.dist ddp, or --optim.name adamw")
    return None


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic, worked out once: tokens per step = micro_batch * seq_len * world * accum."""

    batch_tokens: int
    micro_batch_size: int
    seq_len: int
    world_size: int
    grad_accum_steps: int

    @classmethod
    def make(cls, batch_tokens: int, micro_batch_size: int, seq_len: int, world_size: int = 1) -> "BatchPlan":
        per_micro = micro_batch_size * seq_len * world_size
        if batch_tokens % per_micro:
            raise GPTForgeError(
                f"optim.batch_tokens ({batch_tokens}) must be a multiple of micro_batch_size * seq_len * world_size "
                f"= {micro_batch_size} * {seq_len} * {world_size} = {per_micro}"
            )
        return cls(batch_tokens, micro_batch_size, seq_len, world_size, batch_tokens // per_micro)


def per_rank_sequences(batch_tokens: int, seq_len: int, world_size: int = 1) -> int:
    """Sequences each rank processes per optimizer step: batch_tokens / (seq_len * world_size)."""
    if batch_tokens % (seq_len * world_size):
        raise GPTForgeError(
            f"optim.batch_tokens ({batch_tokens}) must be a multiple of seq_len * world_size "
            f"= {seq_len} * {world_size} = {seq_len * world_size}"
        )
    return batch_tokens // (seq_len * world_size)


def seq_len_of(cfg: TrainConfig) -> int:
    return cfg.data.seq_len or cfg.model.gpt_config().block_size


def field_help(section_cls) -> dict[str, str]:
    """Field name -> its help (the `arg(..., help)` metadata): the CLI help of `gptforge train`."""
    return {f.name: f.metadata.get("help", "") for f in fields(section_cls)}


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
