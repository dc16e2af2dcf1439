"""`gptforge sample CKPT`: generate text from a model, streamed to stdout as it is produced.

CKPT is a gptforge checkpoint directory, a run directory (its newest checkpoint), or a Hugging
Face GPT-2 directory. Each sample prints the prompt, then the continuation token by token; samples
are separated by a line of dashes. Loading and device notes go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from gptforge.device import Runtime
from gptforge.errors import GPTForgeError


def build_parser() -> argparse.ArgumentParser:
    from gptforge.commands.options import add_shared

    p = argparse.ArgumentParser(prog="gptforge sample", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint dir, run dir (newest checkpoint) or Hugging Face GPT-2 dir")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens; 0 = off (default 200)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set holding this probability mass")
    add_shared(p, "seed", type=int, default=None, help="random seed; sample i uses seed + i (default: random)")
    p.add_argument("--num-samples", type=int, default=1, help="number of samples (default 1)")
    add_shared(p, "device", default="auto")
    add_shared(p, "precision", default="auto", choices=["auto", "fp32", "tf32", "bf16", "fp16"])
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (no KV cache)")
    p.add_argument("--no-stop", action="store_true", help="keep going past <|endoftext|>")
    return p


def sample(
    ckpt: str,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    device: str = "auto",
    precision: str = "auto",
    use_cache: bool = True,
    stop_at_eot: bool = True,
    out=None,
) -> list[list[int]]:
    """Stream num_samples continuations of `prompt` to `out` (stdout); return their token ids."""
    from gptforge import sampling as gen
    from gptforge.interop.load import open_source

    out = out or sys.stdout
    gen.validate(max_new_tokens, temperature, top_k, top_p, num_samples)
    runtime = Runtime.make(device, precision)
    source = open_source(ckpt)
    path = source.path
    model = source.load().to(runtime.device)
    print(f"gptforge sample: {path} ({model.num_params() / 1e6:.1f}M parameters) on {runtime.device}, {runtime.precision}", file=sys.stderr)
    tok = source.tokenizer()  # the model's own: GPT-2's, or the one it was trained with
    prompt_ids = tok.encode(prompt, allow_eot=True) or [tok.eot_id]
    results = []
    for i in range(num_samples):
        if i:
            print("-" * 40, file=out)
        decoder = gen.TextDecoder(tok)
        out.write(prompt)
        out.flush()
        ids = []
        for t in gen.stream(
            model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
            None if seed is None else seed + i, tok.eot_id, stop_at_eot, use_cache, runtime,
        ):
            ids.append(t)
            if not (stop_at_eot and t == tok.eot_id):
                out.write(decoder.add(t))
                out.flush()
        out.write(decoder.flush() + "\n")
        out.flush()
        results.append(ids)
    return results


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    if a.top_k is not None and a.top_k == 0:
        a.top_k = None
    if a.top_k is not None and a.top_k < 0:
        raise GPTForgeError(f"--top-k must be >= 0 (0 = off), got {a.top_k}")
    sample(
        a.ckpt, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, a.num_samples,
        a.device, a.precision, use_cache=not a.no_cache, stop_at_eot=not a.no_stop,
    )
    return 0
