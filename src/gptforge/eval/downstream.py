"""Score downstream tasks (gptforge.eval.tasks) with a gptforge model.

Each request is a context and a continuation, tokenized apart with the model's own tokenizer
(an empty context becomes <|endoftext|>), as in gptforge.eval.hellaswag; its score is the summed
log-probability of the continuation's tokens given what precedes them. A row longer than the
model's block_size is cropped from the left, so the continuation stays whole.

Ranked classification picks the choice with the highest score: `acc` on the summed
log-likelihood, `acc_per_char` on it divided by the continuation's characters, `acc_per_token`
by its tokens (HellaSwag's `acc_norm` in gptforge.eval.hellaswag). `centered` rescales the task's
primary metric (oe-eval's, from its config.json) so that chance is 0 and perfect is 1:
(metric - chance) / (1 - chance), chance the mean of 1/num_choices over the examples. A suite's
headline is the mean centered accuracy of its tasks. LAMBADA reports bits per byte of the
continuation (the last word) and last-word accuracy (every continuation token the argmax).

Speed: requests are cut into batches of similar length (one forward each); when the choices of
an example share a context longer than their continuations, the context runs once into a KV
cache and the continuations follow it as one batch. Under torch.distributed each rank scores its
share of the batches (every rank runs the same number of forwards, FSDP needs that) and the
per-request results are all-reduced, so every rank returns the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gptforge.errors import GPTForgeError
from gptforge.eval.tasks import Task, TaskSpec, load_task
from gptforge.loss import HeadLoss

BATCH_TOKENS = 8192  # tokens (rows x padded length) per forward of the length-batched path


@dataclass
class Row:
    """One request's tokens: context, continuation (both whole; cropping happens at batching)."""

    ctx: list[int]
    cont: list[int]


@dataclass
class Scores:
    """Per-request results, flat over the task's requests in file order."""

    ll: torch.Tensor  # (N,) float64 summed log-likelihood of the continuation
    tokens: torch.Tensor  # (N,) scored continuation tokens
    greedy: torch.Tensor  # (N,) 1 where every continuation token is the argmax (LM tasks only)
    cropped: torch.Tensor  # (N,) 1 where the context was cropped to fit block_size


@dataclass
class TaskResult:
    spec: TaskSpec
    kind: str
    metrics: dict
    examples: list[dict] = field(default_factory=list)  # per example: gold and per-request data

    def as_dict(self, with_requests: bool = True) -> dict:
        d = {"task": self.spec.task, "variant": self.spec.variant, **self.metrics}
        if with_requests:
            d["examples"] = self.examples
        return d


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def encode_task(task: Task, tokenizer) -> list[list[Row]]:
    """Token rows per example and choice. An empty continuation (after tokenizing) is an error."""
    cache: dict[str, list[int]] = {}

    def enc(text: str) -> list[int]:
        ids = cache.get(text)
        if ids is None:
            ids = cache[text] = tokenizer.encode(text)
        return ids

    out = []
    for ex in task.examples:
        rows = []
        for r in ex.requests:
            ctx = enc(r.context) or [tokenizer.eot_id]  # the first continuation token needs something to follow
            cont = tokenizer.encode(r.continuation)
            if not cont:
                raise GPTForgeError(f"{r.where}: the continuation tokenizes to nothing (nothing to score)")
            rows.append(Row(ctx, cont))
        out.append(rows)
    return out


@dataclass
class _Job:
    """One unit of work: a length batch of single rows, or one example with a shared context."""

    ids: list[int]  # flat request indices
    rows: list[Row]
    shared: bool


def plan(encoded: list[list[Row]], block_size: int, batch_tokens: int = BATCH_TOKENS,
         share_context: bool | None = None) -> list[_Job]:
    """The forwards to run. share_context None = where the shared context is longer than the
    continuations together (then running it once saves most of the work)."""
    singles: list[tuple[int, Row]] = []
    jobs: list[_Job] = []
    i = 0
    for rows in encoded:
        ids = list(range(i, i + len(rows)))
        i += len(rows)
        ctx = rows[0].ctx
        can_share = (len(rows) >= 2 and len(ctx) >= 2 and all(r.ctx is ctx or r.ctx == ctx for r in rows)
                     and len(ctx) + max(len(r.cont) for r in rows) <= block_size)
        wants = share_context if share_context is not None else len(ctx) > sum(len(r.cont) for r in rows)
        if can_share and wants:
            jobs.append(_Job(ids, rows, True))
        else:
            singles.extend(zip(ids, rows))
    # longest first, so the first batch shows the peak memory
    singles.sort(key=lambda p: -min(len(p[1].ctx) + len(p[1].cont), block_size))
    batch: list[tuple[int, Row]] = []
    for item in singles:
        length = min(len(item[1].ctx) + len(item[1].cont), block_size)
        first = min(len(batch[0][1].ctx) + len(batch[0][1].cont), block_size) if batch else length
        if batch and (len(batch) + 1) * first > batch_tokens:
            jobs.append(_Job([p[0] for p in batch], [p[1] for p in batch], False))
            batch = []
        batch.append(item)
    if batch:
        jobs.append(_Job([p[0] for p in batch], [p[1] for p in batch], False))
    return jobs


def _head(model, runtime, want_logits: bool) -> HeadLoss:
    if want_logits:  # the greedy check needs the logits: the plain path (short LAMBADA rows)
        return HeadLoss("plain", reduction="none")
    rows, block_rows = runtime.lm_head_chunks(model.config.padded_vocab_size)
    return HeadLoss("fused", rows, block_rows, reduction="none")


def _forward(model, x, y, runtime, want_logits: bool, kv_cache=None):
    """(logits or None, per-token losses (B, T) fp32, 0 where y is -1)."""
    with runtime.autocast():
        logits, losses = model(x, y, kv_cache=kv_cache, head_loss=_head(model, runtime, want_logits))
    return logits, losses.view(y.shape)


def _score_rows(model, rows: list[Row], block_size: int, runtime, want_logits: bool):
    """Rows ctx + cont, cropped from the left to block_size, right-padded: (ll, tokens, greedy, cropped) per row."""
    seqs, starts = [], []
    for r in rows:
        full = r.ctx + r.cont
        seq = full[-block_size:]
        seqs.append(seq)
        # targets are positions 1..L-1; the continuation starts at len(seq) - len(cont), never before 1
        starts.append(max(len(seq) - len(r.cont), 1))
    L = max(len(s) for s in seqs)
    x = torch.zeros(len(rows), L, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, (s, a) in enumerate(zip(seqs, starts)):
        x[i, : len(s)] = torch.tensor(s)
        y[i, a - 1 : len(s) - 1] = torch.tensor(s[a:])  # position t predicts token t+1
    x, y = x.to(runtime.device), y.to(runtime.device)
    logits, losses = _forward(model, x, y, runtime, want_logits)
    return _collect(logits, losses, y, [len(r.ctx) + len(r.cont) > block_size for r in rows])


def _collect(logits, losses, y, cropped: list[bool]):
    scored = y != -1
    ll = -(losses.double() * scored).sum(dim=1)
    tokens = scored.sum(dim=1)
    if logits is not None:
        hit = (logits.argmax(dim=-1) == y) | ~scored
        greedy = hit.all(dim=1)
    else:
        greedy = torch.zeros_like(tokens, dtype=torch.bool)
    return ll.cpu(), tokens.cpu(), greedy.cpu(), torch.tensor(cropped)


def _score_shared(model, rows: list[Row], runtime, want_logits: bool):
    """One example whose choices share a context: the context (but its last token) runs once into
    a KV cache; each row then continues it with [last context token] + continuation."""
    from gptforge.model import KVCache

    m = model
    ctx = rows[0].ctx
    dtype = torch.float16 if runtime.precision == "fp16" else torch.bfloat16 if runtime.precision == "bf16" \
        else next(m.parameters()).dtype
    one = KVCache(m.config, 1, device=runtime.device, dtype=dtype)
    prefix = torch.tensor([ctx[:-1]], device=runtime.device)  # (1, Lc-1)
    _forward(model, prefix, torch.full_like(prefix, -1), runtime, False, kv_cache=one)
    cache = KVCache(m.config, len(rows), device=runtime.device, dtype=dtype)
    for layer in range(len(cache.k)):
        cache.k[layer][:, :, : one.pos] = one.k[layer][:, :, : one.pos]  # broadcast over the rows
        cache.v[layer][:, :, : one.pos] = one.v[layer][:, :, : one.pos]
    cache.pos = one.pos
    if one.last_embedding is not None:  # the smear's predecessor (model.smear), broadcast likewise
        cache.last_embedding = one.last_embedding.expand(len(rows), -1, -1)
    L = max(len(r.cont) for r in rows)
    x = torch.zeros(len(rows), L, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        inp = [ctx[-1]] + r.cont[:-1]
        x[i, : len(inp)] = torch.tensor(inp)
        y[i, : len(r.cont)] = torch.tensor(r.cont)
    x, y = x.to(runtime.device), y.to(runtime.device)
    logits, losses = _forward(model, x, y, runtime, want_logits, kv_cache=cache)
    return _collect(logits, losses, y, [False] * len(rows))


@torch.no_grad()
def score(model, encoded: list[list[Row]], runtime, want_logits: bool = False, batch_tokens: int = BATCH_TOKENS,
          share_context: bool | None = None, progress: str | None = None) -> Scores:
    """Per-request scores; under torch.distributed each rank runs its share and all get the totals.
    `progress`: a label for a progress bar on rank 0 (None: no bar)."""
    # `model` is the bare model (the trainer's raw module, not its DDP / compiled wrapper): no DDP
    # forward, and no recompiles for every new length (FSDP2 shards in place: its all-gathers run)
    block_size = model.config.block_size
    n = sum(len(rows) for rows in encoded)
    jobs = plan(encoded, block_size, batch_tokens, share_context)
    rank, world = _dist()
    mine: list[tuple[_Job, bool]] = []  # (job, counted): padding jobs run but are not counted
    for shared in (False, True):  # each kind dealt apart, so every rank runs as many forwards of each
        kind = [j for j in jobs if j.shared is shared]
        share = kind[rank::world]
        per_rank = -(-len(kind) // world)
        mine += [(j, True) for j in share]
        mine += [(kind[0], False) for _ in range(per_rank - len(share))]
    ll = torch.zeros(n, dtype=torch.float64)
    tokens = torch.zeros(n, dtype=torch.float64)
    greedy = torch.zeros(n, dtype=torch.float64)
    cropped = torch.zeros(n, dtype=torch.float64)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(j.ids) for j, c in mine if c), desc=progress, unit="req", dynamic_ncols=True,
                   leave=False)
    was_training = model.training
    model.eval()
    try:
        for job, counted in mine:
            if job.shared:
                res = _score_shared(model, job.rows, runtime, want_logits)
            else:
                res = _score_rows(model, job.rows, block_size, runtime, want_logits)
            if not counted:
                continue
            idx = torch.tensor(job.ids)
            for out, value in zip((ll, tokens, greedy, cropped), res):
                out[idx] = value.double()
            if bar is not None:
                bar.update(len(job.ids))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if world > 1:
        import torch.distributed as dist

        stacked = torch.stack([ll, tokens, greedy, cropped]).to(runtime.device)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        ll, tokens, greedy, cropped = stacked.cpu().unbind(0)
    return Scores(ll, tokens.long(), greedy.bool(), cropped.bool())


def _argmax_first(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def task_metrics(task: Task, encoded: list[list[Row]], scores: Scores) -> TaskResult:
    """The task's figures from per-request scores, and the per-example data behind them."""
    examples, i = [], 0
    for ex, rows in zip(task.examples, encoded):
        reqs = []
        for r, row in zip(ex.requests, rows):
            reqs.append({"ll": float(scores.ll[i]), "bytes": len(r.continuation.encode("utf-8")),
                         "chars": len(r.continuation), "tokens": int(scores.tokens[i]),
                         "greedy": bool(scores.greedy[i]), "cropped": bool(scores.cropped[i])})
            i += 1
        examples.append({"doc_id": ex.doc_id, "gold": ex.gold, "requests": reqs})
    n = len(examples)
    cropped = int(scores.cropped.sum())
    if task.kind == "lm":
        nll = -float(scores.ll.sum())
        n_bytes = sum(r["bytes"] for e in examples for r in e["requests"])
        metrics = {"n": n, "chance": None, "primary_metric": "acc", "acc": float(scores.greedy.double().mean()),
                   "bpb": nll / (math.log(2) * n_bytes), "cropped": cropped}
        return TaskResult(task.spec, task.kind, metrics, examples)
    hits = {"acc": 0, "acc_per_char": 0, "acc_per_token": 0}
    chance = 0.0
    for e in examples:
        lls = [r["ll"] for r in e["requests"]]
        hits["acc"] += _argmax_first(lls) == e["gold"]
        hits["acc_per_char"] += _argmax_first([v / r["chars"] for v, r in zip(lls, e["requests"])]) == e["gold"]
        hits["acc_per_token"] += _argmax_first([v / max(r["tokens"], 1) for v, r in zip(lls, e["requests"])]) == e["gold"]
        chance += 1.0 / len(lls)
    chance /= n
    metrics = {"n": n, "chance": chance, "primary_metric": task.primary_metric,
               **{k: v / n for k, v in hits.items()}}
    metrics["centered"] = (metrics[task.primary_metric] - chance) / (1.0 - chance)
    metrics["cropped"] = cropped
    return TaskResult(task.spec, task.kind, metrics, examples)


def evaluate_task(model, task: Task, tokenizer, runtime, batch_tokens: int = BATCH_TOKENS,
                  share_context: bool | None = None, progress: bool = False) -> TaskResult:
    encoded = encode_task(task, tokenizer)
    scores = score(model, encoded, runtime, want_logits=task.kind == "lm", batch_tokens=batch_tokens,
                   share_context=share_context, progress=task.spec.name if progress else None)
    return task_metrics(task, encoded, scores)


def headline(results: list[TaskResult]) -> float | None:
    """Mean centered accuracy over the classification tasks (None without any)."""
    centered = [r.metrics["centered"] for r in results if r.kind == "choice"]
    return sum(centered) / len(centered) if centered else None


def evaluate_tasks(model, tokenizer, specs: list[TaskSpec], runtime, limit: int | None = None, root=None,
                   batch_tokens: int = BATCH_TOKENS, progress: bool = False) -> dict:
    """The in-loop entry: {"tasks": {name: metrics}, "headline": mean centered accuracy or None}."""
    results = [evaluate_task(model, load_task(s, limit, root), tokenizer, runtime, batch_tokens, progress=progress)
               for s in specs]
    return {"tasks": {r.spec.name: r.metrics for r in results}, "headline": headline(results)}


def format_table(results: list[TaskResult]) -> str:
    """One table: a row per task, the headline last."""
    head = f"{'task':<26} {'n':>6} {'chance':>7} {'acc':>7} {'acc_char':>8} {'acc_tok':>7} {'centered':>8}  metric"
    lines = [head, "-" * len(head)]
    for r in results:
        m = r.metrics
        if r.kind == "lm":
            lines.append(f"{r.spec.name:<26} {m['n']:>6} {'-':>7} {m['acc']:>7.4f} {'-':>8} {'-':>7} {'-':>8}  "
                         f"last-word acc; bits/byte {m['bpb']:.4f}")
        else:
            lines.append(f"{r.spec.name:<26} {m['n']:>6} {m['chance']:>7.4f} {m['acc']:>7.4f} {m['acc_per_char']:>8.4f} "
                         f"{m['acc_per_token']:>7.4f} {m['centered']:>8.4f}  {m['primary_metric']}")
    h = headline(results)
    if h is not None:
        k = sum(r.kind == "choice" for r in results)
        lines.append(f"headline: mean centered accuracy over {k} task(s) = {h:.4f}")
    return "\n".join(lines)


LOOP_LIMIT = 200  # examples per task in training, unless run.eval_tasks says "LIST@N"


def parse_loop_tasks(value: str) -> tuple[list[TaskSpec], int]:
    """run.eval_tasks: "small" or "hellaswag,piqa@100" -> (specs, examples per task)."""
    from gptforge.eval.tasks import parse_names

    names, _, n = value.partition("@")
    try:
        limit = int(n) if n else LOOP_LIMIT
    except ValueError:
        limit = 0
    if limit <= 0:
        raise GPTForgeError(f"run.eval_tasks: {value!r}: after '@' give the examples per task (> 0), e.g. small@100")
    return parse_names(names), limit


def evaluate_loop_tasks(model, tokenizer, value: str, runtime) -> dict:
    """The training loop's figures, flat for metrics.jsonl: tasks_centered (the headline: mean
    centered accuracy) and acc_<task> (each task's primary metric)."""
    specs, limit = parse_loop_tasks(value)
    results = [evaluate_task(model, load_task(s, limit), tokenizer, runtime) for s in specs]
    row = {f"acc_{r.spec.task}": r.metrics[r.metrics["primary_metric"]] for r in results}
    h = headline(results)
    return row if h is None else {"tasks_centered": h, **row}
