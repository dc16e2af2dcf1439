"""HellaSwag, completion style (as in build-nanogpt and llm.c).

Each example is a context and (normally 4) candidate endings. Every ending is scored as a
continuation: the tokens of `ctx + " " + ending` go through the model and the cross-entropy is
taken over the ending's tokens only. `acc` picks the ending with the lowest summed loss, `acc_norm`
the lowest mean per-token loss (which does not favour short endings). The endings of one example
form one right-padded batch; rows longer than the model's block_size are cropped from the left,
so the ending is always kept whole (when it fits).

The data is the official jsonl (https://github.com/rowanz/hellaswag): one JSON object per line
with `ctx`, `endings`, `label` (other fields such as `ctx_a`, `ctx_b`, `activity_label`, `ind`
are ignored). The validation split has 10,042 examples.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from gptforge.errors import GPTForgeError
from gptforge.eval.perplexity import token_losses
from gptforge.fsutil import atomic_path, loads_object
from gptforge.tokenizer import Tokenizer

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILENAME = "hellaswag_val.jsonl"
N_VAL = 10042

# Completion-style scores of OpenAI's GPT-2 on the full validation split (10,042 examples), as
# measured with this same method by build-nanogpt / llm.c (dev/data/hellaswag.py).
REFERENCE = {
    "gpt2 124M": {"acc": 0.2859, "acc_norm": 0.2955},
    "gpt2-xl 1558M": {"acc": 0.3842, "acc_norm": 0.4893},
}


@dataclass
class Example:
    ctx: str
    endings: list[str]
    label: int


def _parse_example(line: str, where: str) -> Example:
    obj = loads_object(line, where, "a JSON object with ctx, endings and label", "; expected one HellaSwag example per line")
    missing = [k for k in ("ctx", "endings", "label") if k not in obj]
    if missing:
        hint = " (the HellaSwag test split is unlabeled: use hellaswag_val.jsonl)" if missing == ["label"] else ""
        raise GPTForgeError(f"{where}: missing field(s) {', '.join(missing)}{hint}")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str):
        raise GPTForgeError(f"{where}: ctx must be a string, got {type(ctx).__name__}")
    if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings)):
        raise GPTForgeError(f"{where}: endings must be a list of at least 2 strings, got {endings!r:.80}")
    if isinstance(label, str) and label.strip().isdigit():  # some copies store "2"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise GPTForgeError(f"{where}: label must be an index into the {len(endings)} endings, got {label!r}")
    return Example(ctx, endings, label)


def iter_examples(path: str | Path, max_examples: int | None = None) -> Iterator[Example]:
    """The examples of a HellaSwag jsonl file, in order; blank lines skipped. A malformed line is
    a GPTForgeError naming the file and line number."""
    path = Path(path)
    if max_examples is not None and max_examples <= 0:
        return
    n = 0
    if path.is_dir():
        raise GPTForgeError(f"{path}: is a directory; expected the HellaSwag file ({FILENAME})")
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: HellaSwag file not found") from e
    except OSError as e:
        raise GPTForgeError(f"{path}: cannot read HellaSwag file ({e.strerror})") from e
    with f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                yield _parse_example(line, f"{path}:{lineno}")
                n += 1
                if max_examples is not None and n >= max_examples:
                    return
        except UnicodeDecodeError as e:
            raise GPTForgeError(f"{path}: not UTF-8 text ({e.reason}); expected HellaSwag jsonl") from e
    if n == 0:
        raise GPTForgeError(f"{path}: no HellaSwag examples in the file")


def load_examples(path: str | Path, max_examples: int | None = None) -> list[Example]:
    """All examples (or the first max_examples), parsed up front so a bad line fails before any scoring."""
    return list(iter_examples(path, max_examples))


def render_example(example: Example, tokenizer: Tokenizer, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (E, L) and mask (E, L) for the E endings: mask is 1 on ending tokens. Rows are
    ctx + " " + ending, cropped from the left to block_size, right-padded with 0."""
    ctx_tokens = tokenizer.encode(example.ctx)
    if not ctx_tokens:
        ctx_tokens = [tokenizer.eot_id]  # an empty context still gives the first ending token something to follow
    rows, masks = [], []
    for ending in example.endings:
        end_tokens = tokenizer.encode(" " + ending)  # byte-level BPEs fold the space into the first token
        row = (ctx_tokens + end_tokens)[-block_size:]
        mask = ([0] * len(ctx_tokens) + [1] * len(end_tokens))[-block_size:]
        rows.append(row)
        masks.append(mask)
    L = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    return tokens, mask


@torch.no_grad()
def score_endings(model, tokens: torch.Tensor, mask: torch.Tensor, runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean per-token loss (E,) of each row's masked tokens, given what precedes them."""
    tokens, mask = tokens.to(runtime.device), mask.to(runtime.device)
    # position t predicts token t+1: the targets are the tokens shifted left, the last unscored;
    # the loss is chunked (no (E, L, V) fp32 logits), as in evaluate_loss
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1)  # (E, L)
    losses = token_losses(model, tokens, targets, runtime)[:, :-1]  # (E, L-1)
    shift_mask = mask[:, 1:].float()  # (E, L-1)
    sum_loss = (losses * shift_mask).sum(dim=1)  # (E,)
    mean_loss = sum_loss / shift_mask.sum(dim=1).clamp(min=1.0)  # (E,)
    return sum_loss, mean_loss



def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_hellaswag(model, path: str | Path, runtime, max_examples: int | None = None, progress: bool = False,
                       tokenizer: Tokenizer | None = None) -> dict:
    """Accuracy on a HellaSwag jsonl file: {"acc", "acc_norm", "n"}, with the model's tokenizer
    (GPT-2's by default). Under torch.distributed the examples are dealt out round-robin across
    ranks and the counts all-reduced (every rank returns the totals). The model is given back in
    the train/eval mode it came in."""
    examples = load_examples(path, max_examples)
    rank, world = _dist()
    mine = examples[rank::world]
    # every rank runs the same number of forwards (FSDP gathers weights in each): pad with
    # repeats whose results are not counted
    padding = (-(-len(examples) // world) - len(mine)) if world > 1 else 0
    tokenizer = tokenizer or Tokenizer()
    block_size = model.config.block_size

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc="hellaswag", unit="ex", dynamic_ncols=True, leave=False)
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    try:
        for i, ex in enumerate(mine + examples[:padding]):
            tokens, mask = render_example(ex, tokenizer, block_size)
            sum_loss, mean_loss = score_endings(model, tokens, mask, runtime)
            if i >= len(mine):
                continue  # padding
            correct += int(sum_loss.argmin().item() == ex.label)
            correct_norm += int(mean_loss.argmin().item() == ex.label)
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()

    n = len(mine)
    if world > 1:
        import torch.distributed as dist

        counts = torch.tensor([correct, correct_norm, n], dtype=torch.long, device=runtime.device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, correct_norm, n = (int(v) for v in counts.tolist())
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def format_reference() -> str:
    """The reference scores, one line: printed beside a model's own."""
    parts = [f"{name} acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f}" for name, r in REFERENCE.items()]
    return f"reference (completion style, all {N_VAL} val examples): " + "; ".join(parts)


def default_cache_dir() -> Path:
    """The gptforge cache (gptforge.fsutil.cache_root) + /hellaswag."""
    from gptforge.fsutil import cache_root

    return cache_root() / "hellaswag"


def download_hellaswag(cache_dir: str | Path | None = None, url: str = URL, timeout: float = 60.0) -> Path:
    """Path of the official validation file in `cache_dir`, downloading it on first call only."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = cache_dir / FILENAME
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPTForgeError(f"cannot create the HellaSwag cache directory {cache_dir} ({e.strerror})") from e
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(dest) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            try:  # a proxy's error page must not land in the cache
                next(iter_examples(tmp, max_examples=1))
            except GPTForgeError as e:
                raise GPTForgeError(f"{url} did not return HellaSwag jsonl: {e}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise GPTForgeError(
            f"no network: pass the path of {FILENAME} (could not download {url}: {reason}); "
            f"copy the file from a machine that is online and give its path "
            f"(gptforge eval --hellaswag PATH; in training --run.hellaswag_path PATH)"
        ) from e
    return dest
