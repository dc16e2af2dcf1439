"""The LM-head loss path: evaluation's memory does not grow with batch x seq_len x vocabulary,
chunk sizes per device, the fused / plain choice (run.lm_head_loss) under faked GPU memory
sizes, and the compiled loss functions (a GPU's) against the eager ones (a CPU's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptforge import config as C
from gptforge.training import plan
from gptforge import loss as L
from gptforge.device import Runtime
from gptforge.loss import HeadLoss
from gptforge.measure import choose_lm_head_loss, lm_head_chunks

# A subprocess (its own memory, peak anonymous RSS sampled by a thread): nano GPT (vocabulary 50257), evaluation losses of one batch of
# `rows` tokens through evaluate_loss's token_losses, then the same batch through the plain path
# (logits + F.cross_entropy) as a control that the measurement sees (B, T, V) fp32 tensors.
MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import torch, torch.nn.functional as F
    from gptforge.device import Runtime
    from gptforge.eval.perplexity import token_losses
    from gptforge.model import GPT, preset

    def anon():  # resident anonymous memory: the heap and mmap'ed tensors, not the libraries' pages
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    class Peak:  # the highest RssAnon while a block runs, sampled every millisecond
        def __enter__(self):
            self.base = self.top = anon()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
            return self
        def sample(self):
            while not self.stop.wait(0.001):
                self.top = max(self.top, anon())
        def __exit__(self, *exc):
            self.stop.set(); self.thread.join(); self.top = max(self.top, anon())

    torch.set_num_threads(1)
    B, T = int(sys.argv[1]), 64
    model = GPT(preset("nano")).eval()
    rt = Runtime(torch.device("cpu"), "fp32")
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 50257, (B, T), generator=g) for _ in range(2))
    with torch.no_grad():
        token_losses(model, x[:1], y[:1], rt)  # warm-up: allocator, kernels
        with Peak() as fused_peak:
            fused = token_losses(model, x, y, rt)
        with Peak() as plain_peak:
            logits, _ = model(x)
            plain = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            del logits
    print(json.dumps({"fused": fused_peak.top - fused_peak.base, "plain": plain_peak.top - plain_peak.base,
                      "diff": float((fused.reshape(-1) - plain).abs().max())}))
""")


def test_evaluation_memory_does_not_grow_with_batch_x_seq_len_x_vocab(tmp_path):
    """4096 tokens: their fp32 logits alone are 823 MB. The chunked per-token losses of
    evaluation stay within one chunk's (256 MB on a CPU) plus its blocks, at 2048 tokens as at
    4096; the plain path, measured the same way in the same process, holds the (B*T, V) fp32
    logits and their log-softmax."""
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    # glibc: every large block mmap'ed, so a freed chunk leaves the resident set at once
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    got = {}
    for B in (32, 64):
        p = subprocess.run([sys.executable, str(script), str(B)], capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        got[B] = json.loads(p.stdout.strip().splitlines()[-1])
        assert got[B]["diff"] < 1e-4  # the same losses
        assert got[B]["plain"] > 1.5 * B * 64 * 50257 * 4  # the control: it sees (B*T, V) fp32 logits + log-softmax
    assert got[64]["fused"] < 320 * 2**20, got  # one 256 MB chunk (one at a time) and its blocks, not 823 MB and more
    assert got[64]["fused"] - got[32]["fused"] < 16 * 2**20, got  # twice the tokens: no growth


def test_chunk_sizes_per_device(monkeypatch):
    """CPU: 256 MB of fp32 logits per matmul chunk, cache-sized (8 MB) elementwise blocks. CUDA:
    one block per chunk, at most 2 GiB of fp32 logits and 1/32 of the GPU's memory."""
    V = 50304
    assert lm_head_chunks(torch.device("cpu"), V) == ((256 << 20) // (4 * V), (1 << 21) // V) == (1334, 41)
    assert Runtime(torch.device("cpu"), "fp32").lm_head_chunks(V) == (1334, 41)

    class Props:
        total_memory = 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    Props.total_memory = 80 * 2**30  # H100: the 2 GiB cap
    rows, block = lm_head_chunks(torch.device("cuda", 0), V)
    assert rows == block == (2 << 30) // (4 * V) == 10672  # 64 x 1024 tokens: 7 chunks
    Props.total_memory = 16 * 2**30  # a 16 GB GPU: 1/32 of it
    assert lm_head_chunks(torch.device("cuda", 0), V) == ((512 << 20) // (4 * V),) * 2


@pytest.fixture
def gpu_memory(monkeypatch):
    """Fake the memory of cuda:0 (GiB): what the choice and the chunk sizes read."""
    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)

    def set_gib(gib: float):
        Props.total_memory = int(gib * 2**30)

    return set_gib


CPU, GPU, V = torch.device("cpu"), torch.device("cuda", 0), 50304


def test_cpu_runs_the_fused_loss_compiled_only_under_compile():
    """Measured faster there (the plain path's fp32 copies cost as much as the head's matmuls);
    each chunk compiled where the run compiles (no slower than the eager in-place blocks)."""
    for compiled in (False, True):
        h = choose_lm_head_loss("auto", CPU, compiled, 4096, V, "bf16", micro_auto=True)
        assert (h.path, h.compiled, (h.rows, h.block_rows)) == ("fused", compiled, lm_head_chunks(CPU, V))
    h = choose_lm_head_loss("plain", CPU, False, 4096, V)
    assert (h.path, h.compiled, h.why) == ("plain", False, "run.lm_head_loss")
    assert choose_lm_head_loss("auto", torch.device("mps"), True, 4096, V).compiled is False


def test_gpt2_124m_config_runs_plain_compiled_logits_on_an_80gb_gpu(gpu_memory):
    """configs/gpt2-124m.toml (compile, micro-batch auto, 524,288 tokens of 1024): the per-rank
    batch is 512 sequences on one GPU, 64 on eight. The plain logits with a compiled cross-entropy
    are chosen, as nanoGPT runs them (the trial step of micro-batch auto then finds what fits with
    that path); it was the eager chunked loop before."""
    cfg = C.resolve(C.packaged_config("gpt2-124m"))
    assert cfg.run.compile and cfg.optim.micro_batch_size == 0 and cfg.data.seq_len == 1024
    vp = cfg.model.gpt_config().padded_vocab_size
    for ranks in (1, 8):
        rows = plan.per_rank_sequences(cfg.optim.batch_tokens, 1024, ranks) * 1024
        h = choose_lm_head_loss(cfg.run.lm_head_loss, GPU, True, rows, vp, cfg.run.precision, micro_auto=True)
        assert (h.path, h.compiled) == ("plain", True), h
        assert "16,384 tokens' logits would take ~4.6 GiB of 80 GiB" in h.why
    # a micro-batch of 64 x 1024 given in the config: ~18.4 GiB, under a quarter of 80 GiB: still plain
    assert choose_lm_head_loss("auto", GPU, True, 64 * 1024, vp, "bf16").path == "plain"
    # ... 128 x 1024 (36.8 GiB) is not: the chunked path, each chunk a compiled graph
    h = choose_lm_head_loss("auto", GPU, True, 128 * 1024, vp, "bf16")
    assert (h.path, h.compiled, h.rows) == ("fused", True, lm_head_chunks(GPU, vp)[0]) and "over 1/4" in h.why
    assert h.describe().startswith("fused, chunks of 10672 rows, compiled (auto: fused, compiled per chunk")


def test_lm_head_choice_follows_the_gpu_memory_and_precision(gpu_memory):
    """Where the plain path's logits (3 copies in the logits' dtype) pass a quarter of the GPU's
    memory, chunking is needed; fp32 logits take twice bf16's."""
    auto = dict(rows=512 * 1024, padded_vocab=V, micro_auto=True)  # judged at a 16k-token micro-batch: ~4.6 GiB
    gpu_memory(24)  # an RTX 4090
    assert choose_lm_head_loss("auto", GPU, True, precision="bf16", **auto).path == "plain"
    assert choose_lm_head_loss("auto", GPU, True, precision="fp32", **auto).path == "fused"  # ~9.2 GiB
    gpu_memory(16)  # a T4 / V100-16GB
    assert choose_lm_head_loss("auto", GPU, True, precision="fp16", **auto).path == "fused"
    gpu_memory(80)
    small = choose_lm_head_loss("auto", GPU, True, 8 * 256, V, "bf16", micro_auto=True)  # a whole per-rank batch under 16k
    assert small.path == "plain" and "2,048 tokens' logits" in small.why
    # a long-context, large-vocabulary micro-batch: chunked even on 80 GB
    assert choose_lm_head_loss("auto", GPU, True, 32 * 1024, 256 * 1024, "bf16").path == "fused"
    # without compile nothing is compiled: the eager chunked loop (the eager plain path's fp32 copies)
    h = choose_lm_head_loss("auto", GPU, False, 16 * 1024, V, "bf16")
    assert (h.path, h.compiled) == ("fused", False) and "without compile" in h.why
    # given: as given; compiled where the run compiles on CUDA
    for path in ("plain", "fused"):
        h = choose_lm_head_loss(path, GPU, True, 128 * 1024, V)
        assert (h.path, h.compiled, h.why) == (path, True, "run.lm_head_loss")
        assert choose_lm_head_loss(path, GPU, False, 128 * 1024, V).compiled is False


@pytest.fixture
def aot_eager(monkeypatch):
    """The loss's compiled functions through aot_eager (dynamo + AOT autograd, no codegen: fast
    on a CPU), counting the graphs dynamo captures."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    monkeypatch.setattr(L, "COMPILE_BACKEND", counter)
    yield counter
    torch._dynamo.reset()


def _head_grads(head_loss, x, w, t, dtype):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        _, loss = head_loss(x, w, t, 1000)
    (loss * (1024.0 if dtype == torch.float16 else 1.0)).backward()  # fp16: scaled, as GradScaler does
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_compiled_loss_functions_equal_the_eager_ones(aot_eager, dtype):
    """The fused path's compiled chunk (matmul + loss + gradient in one graph; in fp16 the loss in
    forward and the scaled gradient recomputed in backward) and the plain path's compiled
    cross-entropy give the eager path's loss and gradients: padded vocabulary (1000 of 1024),
    ignored targets, 300 rows in chunks of 128 (two chunk sizes)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 100, 32, generator=g), torch.randn(1024, 32, generator=g) * 0.5
    t = torch.randint(0, 1000, (3, 100), generator=g)
    t[:, ::7] = -1
    tol = dict(rtol=1e-5, atol=1e-6) if dtype is None else dict(rtol=2e-2, atol=1e-4)
    for path in ("fused", "plain"):
        eager = _head_grads(HeadLoss(path, 128, 40), x, w, t, dtype)
        frames = aot_eager.frame_count
        compiled = _head_grads(HeadLoss(path, 128, 40, compiled=True), x, w, t, dtype)
        assert aot_eager.frame_count > frames, path  # the compiled graphs ran
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, **tol)
        assert compiled[2][1000:].abs().max() == 0  # padded rows of the head: no gradient
    # the fused path's gradients equal the plain path's too (the eager ones: tests/test_model.py)
    for a, b in zip(_head_grads(HeadLoss("fused", 128, 40, compiled=True), x, w, t, dtype),
                    _head_grads(HeadLoss("plain"), x, w, t, dtype)):
        torch.testing.assert_close(a, b, **(tol if dtype is None else dict(rtol=5e-2, atol=5e-3)))


@pytest.mark.slow
def test_compiled_chunks_inside_a_compiled_model(aot_eager):
    """Under torch.compile of the whole model the fused loss is a graph break whose chunks still
    run as their own compiled graph; the plain cross-entropy is traced into the model's graph.
    Both give the eager model's loss and head gradient."""
    from gptforge.model import GPT, preset

    torch.manual_seed(0)
    model = GPT(preset("nano"))
    x, y = torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))

    def run(head_loss, compile_model: bool):
        model.zero_grad(set_to_none=True)
        model.head_loss = head_loss
        _, loss = (torch.compile(model, backend="eager") if compile_model else model)(x, y)
        loss.backward()
        return loss.item(), model.lm_head.weight.grad.clone()

    ref = run(HeadLoss("fused", 40, 16), compile_model=False)
    for path, frames in (("fused", 2), ("plain", 0)):  # fused: chunks of 40, then 24 rows
        before = aot_eager.frame_count
        loss, grad = run(HeadLoss(path, 40, 16, compiled=True), compile_model=True)
        assert aot_eager.frame_count - before == frames, path
        assert loss == pytest.approx(ref[0], abs=1e-5)
        torch.testing.assert_close(grad, ref[1], rtol=1e-4, atol=1e-6)
        torch._dynamo.reset()


def test_config_lm_head_loss_is_validated():
    assert C.resolve(None, [("run.lm_head_loss", "plain")]).run.lm_head_loss == "plain"
    with pytest.raises(Exception, match=r"run.lm_head_loss must be auto, fused or plain, got 'fast'"):
        C.resolve(None, [("run.lm_head_loss", "fast")])
