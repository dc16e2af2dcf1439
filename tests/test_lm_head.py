"""The LM-head loss path: evaluation's memory does not grow with batch x seq_len x vocabulary,
chunk sizes per device, and the fused / plain choice (run.lm_head_loss)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptforge import config as C
from gptforge.device import Runtime, choose_lm_head_loss, lm_head_chunks

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


def test_choice_of_the_lm_head_loss_path(monkeypatch):
    class Props:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    cpu, gpu, V = torch.device("cpu"), torch.device("cuda", 0), 50304
    assert choose_lm_head_loss("auto", cpu, False, 4096, V)[0] is True
    assert choose_lm_head_loss("auto", cpu, True, 4096, V)[0] is True
    assert choose_lm_head_loss("plain", cpu, False, 4096, V) == (False, "run.lm_head_loss")
    assert choose_lm_head_loss("fused", gpu, True, 16 * 1024, V) == (True, "run.lm_head_loss")
    assert choose_lm_head_loss("auto", gpu, False, 16 * 1024, V)[0] is True  # eager: fp32 copies
    # compiled: plain while its logits fit in a quarter of the GPU (16 x 1024 x 50304 x 10 B = 7.7 GiB) ...
    fused, why = choose_lm_head_loss("auto", gpu, True, 16 * 1024, V)
    assert fused is False and "unmeasured" in why
    # ... the 124M config's micro-batch of 64 x 1024 would need ~30.7 GiB: fused
    fused, why = choose_lm_head_loss("auto", gpu, True, 64 * 1024, V)
    assert fused is True and "30.7 GiB" in why


def test_config_lm_head_loss_is_validated():
    assert C.resolve(None, [("run.lm_head_loss", "plain")]).run.lm_head_loss == "plain"
    with pytest.raises(Exception, match=r"run.lm_head_loss must be auto, fused or plain, got 'fast'"):
        C.resolve(None, [("run.lm_head_loss", "fast")])
