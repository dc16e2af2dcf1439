"""CUDA-only branches checked on a CPU: the GPU peak table's name matching, one device per rank
set before CUDA is touched, and the host syncs of a training step (see tests/test_gpu.py for
the same paths on a GPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from gptforge.device import GPU_PEAK_TFLOPS, gpu_peak_tflops, gpu_table_key
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


def step_cfg(tmp_path, shards_dir, **overrides):
    """nano, 4 micro-batches of 2 per step, fp32 on the CPU, spike guard on."""
    from gptforge import config as C

    keys = {"model.preset": "nano", "data.dir": str(shards_dir), "data.seq_len": "32", "data.prefetch": "0",
            "optim.batch_tokens": "256", "optim.micro_batch_size": "2", "run.dir": str(tmp_path / "run"),
            "run.device": "cpu", "run.precision": "fp32", "run.peak_tflops": "1", "run.max_steps": "8",
            "optim.spike_guard": "on", **overrides}
    return C.resolve(None, [(k, str(v)) for k, v in keys.items()])


def count_reads(monkeypatch) -> list[str]:
    """Every `.item()`, `.tolist()`, float(), bool() or int() of a tensor in gptforge's code."""
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
    return reads


def test_a_logging_step_reads_the_device_once(tmp_path, shards_dir, monkeypatch):
    """log_every 1 (the default): per step one device-to-host read (loss, grad norm and the
    device's skip decision together) and the synchronizes around the timed step; no `.item()`
    per micro-batch. Counted on a CPU: the same code runs on a GPU."""
    from gptforge.training import trainer as trainer_mod

    t = trainer_mod.Trainer(step_cfg(tmp_path, shards_dir, **{"run.max_steps": 3}), progress=False)
    reads = count_reads(monkeypatch)
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


@pytest.mark.parametrize("fused", ["on", "off"])
def test_steps_between_logging_steps_neither_synchronize_nor_read(tmp_path, shards_dir, monkeypatch, fused):
    """log_every 4 over 8 steps. Fused AdamW (the GPU's default) takes the skip decided on the
    device: the logging steps 0 and 4 synchronize where the clock is read and read the values of
    the steps since the last read in one transfer; the six others synchronize nothing and read
    nothing. The for-each / single-tensor AdamW (a CPU's default) cannot take it, so the host
    reads each step before its update: one transfer a step, still no synchronize between logs."""
    from gptforge.training import trainer as trainer_mod

    t = trainer_mod.Trainer(step_cfg(tmp_path, shards_dir, **{"run.log_every": 4, "optim.fused": fused}), progress=False)
    assert hasattr(t.optimizer, "_step_supports_amp_scaling") == (fused == "on")
    transfers, syncs = [], []
    host_values = distrib.host_values
    monkeypatch.setattr(distrib, "host_values", lambda *ts: transfers.append(t.step) or host_values(*ts))
    monkeypatch.setattr(trainer_mod, "synchronize", lambda device: syncs.append(t.step))
    reads = count_reads(monkeypatch)
    try:
        rows = [t.train_step() for _ in range(8)]
        assert syncs == [0, 0, 4, 4]
        assert transfers == ([0, 4] if fused == "on" else list(range(8)))
        assert reads == ["tolist"] * len(transfers)  # nothing else reads the device
        if fused == "on":
            assert ["loss" in r for r in rows] == [True] * 5 + [False] * 3  # 5..7: on the device still
        t.read_values()  # what the loop does before an evaluation, a checkpoint, the end
        assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in rows)
        assert [("dt_ms" in r) for r in rows] == [s % 4 == 0 for s in range(8)]  # only a logging step is timed
    finally:
        t.loader.close()
        t.val_loader.close()
