"""Autoregressive sampling with a KV cache.

One loop (`stream_batch`) yields the next token of every row at each step; `generate`,
`generate_batch` and `stream` are views of it. The prompt is run once to fill the cache, then one
token per step. GPT-2's positions are learned and absolute, so once the context would pass
block_size the window slides: the cache is rebuilt from the last block_size tokens at every such
step. That is exactly what uncached decoding computes, only no faster than it.

Sampling: temperature (0 = greedy argmax), then top-k, then top-p (nucleus), drawn with a seeded
torch.Generator so a seed gives the same text twice. Logits cover the real vocabulary only (the
model slices off padded rows), so padded ids are never produced.
"""

from __future__ import annotations

import codecs
import contextlib
from typing import Callable, Iterator, Sequence

import torch

from gptforge.device import DTYPES, Runtime
from gptforge.errors import GPTForgeError
from gptforge.model import GPT
from gptforge.model import KVCache

EOT_ID = 50256


def validate(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, num_samples: int = 1) -> None:
    """All sampling arguments at once; one message naming each bad value."""
    problems = []
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        problems.append(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:  # also rejects NaN
        problems.append(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        problems.append(f"top_k must be an integer >= 1 (or unset), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1] (or unset), got {top_p!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        problems.append(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if problems:
        raise GPTForgeError("; ".join(problems))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def _cache_dtype(model: GPT, runtime: Runtime | None) -> torch.dtype:
    """Keys/values come out of c_attn in the autocast dtype when autocast is on."""
    if runtime is not None and runtime.precision in ("bf16", "fp16"):
        return DTYPES[runtime.precision]
    return next(model.parameters()).dtype


# no_grad, not inference_mode: the model may be sharded by FSDP2, which rejects inference tensors in
# several torch versions ("Inference tensors do not track version counter")
@torch.no_grad()
def stream_batch(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    runtime: Runtime | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of each of num_samples rows, (num_samples,) on the CPU, per step,
    for max_new_tokens steps (the caller stops early, e.g. at EOT). An empty prompt starts from
    <|endoftext|>, as GPT-2 documents begin. The model runs where its parameters are."""
    validate(max_new_tokens, temperature, top_k, top_p, num_samples)
    device = next(model.parameters()).device
    block_size = model.config.block_size
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        if model.config.vocab_size <= EOT_ID:
            raise GPTForgeError("the prompt is empty and this model's vocabulary has no <|endoftext|> to start from")
        prompt = [EOT_ID]
    bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
    if bad:
        raise GPTForgeError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {model.config.vocab_size})")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    autocast = runtime.autocast if runtime is not None else contextlib.nullcontext

    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor(prompt, dtype=torch.long, device=device).expand(num_samples, -1)  # (B, T)
        cache = KVCache(model.config, num_samples, device=device, dtype=_cache_dtype(model, runtime)) if use_cache else None
        feed = None  # what the cache has not seen yet; None = (re)fill it from the window
        for _ in range(max_new_tokens):
            with autocast():
                if cache is None:
                    logits, _ = model(idx[:, -block_size:])  # (B, T, V)
                else:
                    if feed is None or cache.pos + feed.size(1) > block_size:
                        cache.pos = 0  # slide the window: positions changed, recompute it all
                        feed = idx[:, -block_size:]
                    logits, _ = model(feed, kv_cache=cache)  # (B, T, V)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            idx = torch.cat([idx, nxt[:, None]], dim=1)  # (B, T+1)
            feed = nxt[:, None]  # (B, 1)
            yield nxt.cpu()
    finally:
        model.train(was_training)


def generate_batch(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int = EOT_ID,
    stop_at_eot: bool = True,
    use_cache: bool = True,
    runtime: Runtime | None = None,
) -> list[list[int]]:
    """num_samples continuations of one prompt, sampled together: the new tokens of each row
    (a row that stops at EOT ends with eot_id)."""
    rows: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for step in stream_batch(model, prompt_ids, max_new_tokens, num_samples, temperature, top_k, top_p, seed, use_cache, runtime):
        for i, tok in enumerate(step.tolist()):
            if not done[i]:
                rows[i].append(tok)
                done[i] = stop_at_eot and tok == eot_id
        if all(done):
            break
    return rows


def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int = EOT_ID,
    stop_at_eot: bool = True,
    use_cache: bool = True,
    runtime: Runtime | None = None,
) -> list[int]:
    """The new tokens after prompt_ids (ending with eot_id when generation stopped there)."""
    return list(stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, eot_id, stop_at_eot, use_cache, runtime))


def stream(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int = EOT_ID,
    stop_at_eot: bool = True,
    use_cache: bool = True,
    runtime: Runtime | None = None,
    callback: Callable[[int], None] | None = None,
) -> Iterator[int]:
    """The new token ids one at a time, as they are sampled; callback(token) too, if given."""
    steps = stream_batch(model, prompt_ids, max_new_tokens, 1, temperature, top_k, top_p, seed, use_cache, runtime)
    try:
        for step in steps:
            tok = int(step[0])
            if callback is not None:
                callback(tok)
            yield tok
            if stop_at_eot and tok == eot_id:
                return
    finally:
        steps.close()  # restores the model's train/eval mode even when the caller stops early


class TextDecoder:
    """Token ids -> text, incrementally: a character split across tokens (multi-byte UTF-8) is
    held back until its last byte arrives, so streamed output is never garbled."""

    def __init__(self, tokenizer=None):
        if tokenizer is None:
            from gptforge.tokenizer import Tokenizer

            tokenizer = Tokenizer()
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text that became complete with this token (possibly empty)."""
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
