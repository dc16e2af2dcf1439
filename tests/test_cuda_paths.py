"""CUDA-only branches checked on a CPU: the GPU peak table's name matching, one device per rank
set before CUDA is touched, and the host syncs of a training step (see tests/test_gpu.py for
the same paths on a GPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from gptforge.measure import GPU_PEAK_TFLOPS, gpu_peak_tflops, gpu_table_key
from gptforge.training import distributed as distrib

# what torch.cuda.get_device_name() says on each part -> the table entry (None: not in the table,
# MFU then uses a measured matmul peak)
NAMES = {
    "NVIDIA H100 80GB HBM3": "H100",  # SXM5
    "NVIDIA H100": "H100",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 PCIE": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A10G": "A10G",
    "NVIDIA A10": None,  # not an A100, nor an A10G
    "NVIDIA L4": "L4",
    "NVIDIA L40S": None,  # not an L4
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "Tesla V100-SXM2-16GB": "V100",
    "Tesla T4": "T4",
    "NVIDIA H800": None,
}


@pytest.mark.parametrize("name,key", NAMES.items())
def test_gpu_names_match_their_table_entry(name, key):
    assert gpu_table_key(name) == key


def test_dense_bf16_peaks(monkeypatch):
    """The MFU denominators: dense (no sparsity) bf16 of NVIDIA's data sheets."""
    want = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.0,
            "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA H100 NVL": 835.0}
    for name, peak in want.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu_peak_tflops(torch.device("cuda", 0), "bf16") == peak, name
    assert GPU_PEAK_TFLOPS["H100"]["tf32"] == 494.0 and GPU_PEAK_TFLOPS["A100"]["tf32"] == 156.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert gpu_peak_tflops(torch.device("cuda", 0), "bf16") is None  # no bf16 there: probe instead


def test_each_rank_makes_its_gpu_current_before_cuda_is_touched(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    env = distrib.DistEnv(rank=3, local_rank=2, world_size=4)
    assert distrib.device_for(env, "auto") == "cuda:2" and calls == [2]
    assert distrib.device_for(distrib.DistEnv(), "auto") == "auto" and calls == [2]  # one process: untouched
    with pytest.raises(Exception, match="LOCAL_RANK 5 has no GPU: this node has 4"):
        distrib.device_for(distrib.DistEnv(rank=5, local_rank=5, world_size=6), "cuda")


def test_a_training_step_reads_the_device_once(tmp_path, shards_dir, monkeypatch):
    """Per step one device-to-host read (loss and grad norm together, which the NaN check, the
    spike guard and the log need before the update) and the synchronize that ends the timed
    step; no `.item()` per micro-batch. Counted on a CPU: the same code runs on a GPU."""
    from gptforge import config as C
    from gptforge.training import trainer as trainer_mod

    cfg = C.resolve(None, [("model.preset", "nano"), ("data.dir", str(shards_dir)), ("data.seq_len", "32"),
                           ("data.prefetch", "0"), ("optim.batch_tokens", "256"), ("optim.micro_batch_size", "2"),
                           ("run.dir", str(tmp_path / "run")), ("run.device", "cpu"), ("run.precision", "fp32"),
                           ("run.peak_tflops", "1"), ("run.max_steps", "3"), ("optim.spike_guard", "on")])
    t = trainer_mod.Trainer(cfg, progress=False)
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *a):
            caller = sys._getframe(1).f_code.co_filename  # gptforge's reads; torch's CPU-side step counters aside
            if "gptforge" in caller:
                reads.append(name)
            return original(self, *a)
        return read

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    syncs = []
    monkeypatch.setattr(trainer_mod, "synchronize", lambda device: syncs.append(device))
    try:
        rows = [t.train_step() for _ in range(2)]  # 4 micro-batches each
    finally:
        t.loader.close()
        t.val_loader.close()
    assert t.plan.grad_accum_steps == 4
    assert reads == ["tolist", "tolist"], reads
    assert len(syncs) == 4  # before and after each timed step (no-ops on a CPU)
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in rows)
