"""CUDA-only branches checked on a CPU: the GPU peak table's name matching, one device per rank
set before CUDA is touched (and no explicit GPU index under torchrun), the host syncs of a
training step, each rank's own GPU generator in checkpoints (a fake torch.cuda), and a GPU-sized
model refusing to fall back to the CPU (see tests/test_gpu.py for the same paths on a GPU)."""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gptforge.errors import GPTForgeError
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


def step_cfg(tmp_path, shards_dir, **overrides):
    """nano, 4 micro-batches of 2 per step, fp32 on the CPU, spike guard on."""
    from gptforge import config as C

    keys = {"model.preset": "nano", "model.arch": "gpt2", "data.dir": str(shards_dir), "data.seq_len": "32", "data.prefetch": "0",
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


# ----------------------------------------------------------------------------- issue 17
def test_an_explicit_gpu_index_under_torchrun_is_an_error(monkeypatch):
    """`--run.device cuda:0` under torchrun put every rank on GPU 0; the index is LOCAL_RANK's."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    env = distrib.DistEnv.from_env()
    with pytest.raises(GPTForgeError, match=r"run.device is 'cuda:0' under torchrun \(2 ranks\): each rank takes "
                                            r"cuda:LOCAL_RANK itself; use --run.device cuda"):
        distrib.device_for(env, "cuda:0")
    assert distrib.device_for(env, "cuda") == "cuda:1" and distrib.device_for(env, "auto") == "cuda:1"
    assert distrib.device_for(env, "cpu") == "cpu"
    assert distrib.device_for(distrib.DistEnv(), "cuda:1") == "cuda:1"  # one process: any GPU it names


GPT2_124M = Path(__file__).parent.parent / "configs" / "gpt2-124m.toml"


class FakeCuda:
    """torch.cuda's generator functions over `count` visible GPUs, each generator state a distinct
    tensor; like torch's, an index past the visible GPUs is an IndexError."""

    def __init__(self, monkeypatch, count: int):
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]
        def idx(device) -> int:
            if isinstance(device, int):
                return device
            return torch.device(device).index or 0 if device is not None else 0

        patches = {
            "is_available": lambda: True, "device_count": lambda: count,
            "get_rng_state": lambda device="cuda": self.states[idx(device)].clone(),
            "set_rng_state": lambda state, device="cuda": self._set(idx(device), state),
            "get_rng_state_all": lambda: [s.clone() for s in self.states],
            "set_rng_state_all": lambda states: [self._set(i, s) for i, s in enumerate(states)],
        }
        for name, fn in patches.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def _set(self, i: int, state: torch.Tensor) -> None:
        self.states[i]  # noqa: B018 (IndexError where torch's default_generators[i] has none)
        self.states[i] = state.clone()


def test_each_rank_saves_its_own_gpu_generator_and_restores_it_by_rank(monkeypatch):
    """A checkpoint of 8 GPUs resumed where one is visible: rank 0's state onto cuda:0, no
    IndexError (rank 0 used to save and restore get_rng_state_all: one state per visible GPU)."""
    from gptforge.training import checkpoint as ckpt

    cuda = FakeCuda(monkeypatch, 8)
    saved = []
    for rank in range(8):  # as 8 ranks save them: each its own GPU's generator, and its own CPU state
        torch.manual_seed(100 + rank)
        saved.append(ckpt.rng_state(torch.device("cuda", rank)))
        assert torch.equal(saved[-1]["cuda"], cuda.states[rank])
    FakeCuda(monkeypatch, 1)  # a machine with one GPU
    with pytest.warns(UserWarning, match=r"RNG states of 8 rank\(s\) on 1: .*only without dropout"):
        ckpt.restore_rng(saved, 0, 1, torch.device("cuda", 0))
    assert torch.equal(torch.cuda.get_rng_state(0), saved[0]["cuda"])
    assert torch.equal(torch.get_rng_state(), saved[0]["torch"])
    # the same world size: rank 3 takes rank 3's states, its CPU generator's too
    cuda = FakeCuda(monkeypatch, 8)
    ckpt.restore_rng(saved, 3, 8, torch.device("cuda", 3))
    assert torch.equal(cuda.states[3], saved[3]["cuda"]) and torch.equal(torch.get_rng_state(), saved[3]["torch"])
    assert torch.equal(cuda.states[0], torch.full((16,), 0, dtype=torch.uint8))  # the others untouched
    # a checkpoint before per-rank states: one dict, every visible GPU's generator of rank 0
    FakeCuda(monkeypatch, 1)
    old = {**saved[0], "cuda": [torch.full((16,), 50 + i, dtype=torch.uint8) for i in range(8)]}
    ckpt.restore_rng(old, 0, 1, torch.device("cuda", 0))
    assert torch.equal(torch.cuda.get_rng_state(0), old["cuda"][0])
    ckpt.restore_rng(saved[:1], 0, 1, torch.device("cpu"))  # a GPU checkpoint resumed on a CPU: no GPU to restore


def test_a_gpu_sized_model_does_not_fall_back_to_the_cpu(shards_dir, tmp_path, capsys):
    """configs/gpt2-124m.toml with device auto and no usable CUDA: one line saying why (torch's
    own reason) and how to force the CPU, where it used to start a 124M run on the CPU."""
    from gptforge import cli

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = ["train", "--config", str(GPT2_124M), "--data.dir", str(shards_dir), "--run.dir", str(tmp_path / "run")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(r"gptforge train: error: run.device auto found no GPU \((.+)\) for a model of 124M parameters, "
                        r"which is GPU work; to train it on the CPU anyway, pass --run.device cpu", err), err
    if torch.version.cuda is None:  # this CPU wheel
        assert f"this torch ({torch.__version__}) is a CPU-only build: torch.version.cuda is None" in err
    assert not (tmp_path / "run").exists()


def test_the_reason_cuda_is_unavailable_is_torchs_own(monkeypatch):
    from gptforge.device import GPU_SCALE_PARAMS, cuda_unavailable_reason
    from gptforge.model import GPT, preset

    with torch.device("meta"):
        assert GPT(preset("gpt2")).num_params(non_embedding=True) == GPU_SCALE_PARAMS

    def no_driver():
        warnings.warn("CUDA initialization: Found no NVIDIA driver on your system. Please check that you have an "
                      "NVIDIA GPU and installed a driver")
        return False

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", no_driver)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    why = cuda_unavailable_reason()
    assert why.startswith(f"torch {torch.__version__} (CUDA 12.8) sees 0 GPUs (CUDA_VISIBLE_DEVICES='')")
    assert why.endswith("CUDA initialization: Found no NVIDIA driver on your system. Please check that you have an "
                        "NVIDIA GPU and installed a driver")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_unavailable_reason().endswith(": no NVIDIA driver or device found")


def test_only_auto_refuses_and_only_a_gpu_sized_model_on_the_cpu():
    from gptforge.device import GPU_SCALE_PARAMS, refuse_cpu_fallback

    cpu = torch.device("cpu")
    refuse_cpu_fallback("cpu", cpu, 10 * GPU_SCALE_PARAMS)  # asked for: trains
    refuse_cpu_fallback("auto", cpu, GPU_SCALE_PARAMS - 1)  # smaller than GPT-2 124M: trains on the CPU
    refuse_cpu_fallback("auto", torch.device("mps"), GPU_SCALE_PARAMS)  # a GPU was found
    with pytest.raises(GPTForgeError, match=r"run.device auto found no GPU .* for a model of 124M parameters"):
        refuse_cpu_fallback("auto", cpu, GPU_SCALE_PARAMS)


@pytest.mark.slow
def test_an_explicit_cpu_still_trains_a_gpu_sized_model(shards_dir, tmp_path):
    from gptforge import config as C
    from gptforge.training.trainer import Trainer

    over = {"data.dir": shards_dir, "run.dir": tmp_path / "run", "run.device": "cpu", "run.precision": "fp32",
            "run.compile": "false", "data.seq_len": 16, "data.prefetch": 0, "optim.batch_tokens": 32,
            "optim.micro_batch_size": 2, "run.peak_tflops": 1.0, "data.verify": "off"}
    t = Trainer(C.resolve(GPT2_124M, [(k, str(v)) for k, v in over.items()]), progress=False)
    try:
        assert t.model.num_params() > 124e6 and t.rt.device.type == "cpu"
        assert math.isfinite(t.train_step()["loss"])
    finally:
        t.loader.close()
        t.val_loader.close()


@pytest.mark.parametrize("fused", ["on", "off"])
def test_steps_between_logging_steps_neither_synchronize_nor_read(tmp_path, shards_dir, monkeypatch, fused):
    """log_every 4 over 8 steps, spike guard off, fused or for-each AdamW alike: the logging steps 0
    and 4 synchronize where the clock is read and read the values of the steps since the last read
    in one transfer; the six others synchronize nothing and read nothing."""
    from gptforge.training import trainer as trainer_mod

    t = trainer_mod.Trainer(step_cfg(tmp_path, shards_dir, **{"run.log_every": 4, "optim.fused": fused,
                                                               "optim.spike_guard": "off"}), progress=False)
    assert hasattr(t.optimizer, "_step_supports_amp_scaling") == (fused == "on")
    transfers, syncs = [], []
    host_values = distrib.host_values
    monkeypatch.setattr(distrib, "host_values", lambda *ts: transfers.append(t.step) or host_values(*ts))
    monkeypatch.setattr(trainer_mod, "synchronize", lambda device: syncs.append(t.step))
    reads = count_reads(monkeypatch)
    try:
        rows = [t.train_step() for _ in range(8)]
        assert syncs == [0, 0, 4, 4]
        assert transfers == [0, 4]
        assert reads == ["tolist"] * len(transfers)  # nothing else reads the device
        assert ["loss" in r for r in rows] == [True] * 5 + [False] * 3  # 5..7: on the device still
        t.read_values()  # what the loop does before an evaluation, a checkpoint, the end
        assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in rows)
        assert [("dt_ms" in r) for r in rows] == [s % 4 == 0 for s in range(8)]  # only a logging step is timed
    finally:
        t.loader.close()
        t.val_loader.close()
