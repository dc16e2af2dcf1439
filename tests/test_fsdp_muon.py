"""Muon under FSDP2 on 2 gloo ranks (torchrun, CPU): each matrix's update is orthogonalized whole,
so a step on row shards is the one-process step bit for bit; a training run follows the
one-process trajectory and resumes bitwise; the same with every Muon variant on (their state
sharded, gathered and re-sharded through the checkpoint).

The single-process reference runs in this process with the same global batch (micro-batch 8
against 2 ranks x 4), as tests/test_distributed.py does; its helpers launch the runs. Training
losses agree to 3e-4, not 1e-5: the ranks' gradients are summed in another order (~1e-7 apart),
and Newton-Schulz runs in bf16 (torch.optim.Muon's numerics), where such last-bit differences
round apart (measured on 20 steps: 5.4e-5 at step 1, at most 1.1e-4, not growing). The step
itself is compared bitwise, on gradients that are the same on both sides.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gptforge import config as C
from gptforge.training import checkpoint as ckpt
from gptforge.training.trainer import train
from test_distributed import assert_close, ok, overrides, torchrun, train_losses

STEP = """
    import sys
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from gptforge import config as C
    from gptforge.model import GPT, preset
    from gptforge.training.optim import make_optimizer

    dist.init_process_group("gloo")
    args = C.resolve(None, [a.split("=", 1) for a in sys.argv[1:]]).optim
    torch.manual_seed(0)
    ref = GPT(preset("nano"))
    torch.manual_seed(0)
    model = GPT(preset("nano"))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    cpu = torch.device("cpu")
    o_ref, o = make_optimizer(ref, args, cpu, "muon"), make_optimizer(model, args, cpu, "muon")
    for step in range(3):
        torch.manual_seed(100 + step)
        grads = {n: torch.randn_like(p) for n, p in ref.named_parameters()}
        for n, p in ref.named_parameters():
            p.grad = grads[n].clone()
        for n, p in model.named_parameters():
            p.grad = distribute_tensor(grads[n], p.device_mesh, p.placements)
        o_ref.step()
        o.step()
    names = set(ref.state_dict())
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        assert q.to_local().shape != p.shape or n.endswith("bias") or q.dim() < 2, n  # really sharded
        assert torch.equal(p, q.full_tensor()), n
    if dist.get_rank() == 0:  # each rank asserted its own; one line to read
        print("BITWISE", sum(1 for g in o.param_groups if g["kind"] == "muon" for _ in g["params"]))
    # gptforge's own teardown (training.distributed.shutdown): gloo's workers idle before the group goes
    dist.barrier()
    time.sleep(0.2)
    dist.destroy_process_group()
"""

pytestmark = pytest.mark.slow

STEPS, HALF = 20, 10
TOL = 3e-4
MUON = {"optim.name": "muon", "run.max_steps": STEPS, "run.ckpt_every": HALF, "run.sample_tokens": 0}
VARIANTS = {**MUON, "run.max_steps": 6, "run.ckpt_every": 3, "optim.muon_ns": "polar_express",
            "optim.muon_normuon": "true", "optim.muon_cautious_wd": "true", "optim.muon_momentum_warmup": 4,
            "optim.muon_weight_decay": 0.1, "optim.muon_split": "false"}  # split: the parametrized test below


@pytest.mark.parametrize("variant", [[], ["optim.muon_ns=polar_express", "optim.muon_normuon=true",
                                          "optim.muon_cautious_wd=true", "optim.muon_momentum_warmup=2",
                                          "optim.muon_split=true"]])
def test_a_step_on_fsdp_shards_is_the_one_process_step_bitwise(tmp_path, variant):
    """The same full gradients on both sides: 3 steps of MuonAdamW on FSDP2 row shards (2 ranks) give
    the one-process parameters bit for bit, every Muon matrix orthogonalized whole."""
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "step.py"
    script.write_text(textwrap.dedent(STEP))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "optim.name=muon", "optim.muon_weight_decay=0.1", *variant]
    p = ok(subprocess.run(cmd, capture_output=True, text=True, timeout=150,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}))
    assert p.stdout.count("BITWISE 8") == 1


def single_run(run: Path, shards_dir: Path, **extra) -> Path:
    train(C.resolve(None, list(overrides(run, shards_dir, 8, **extra).items())), progress=False)
    return run


def step_dir(run: Path, step: int) -> Path:
    return ckpt.checkpoints_dir(run) / ckpt.step_dir_name(step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fsdp_muon")
    out = {"single": single_run(base / "single", shards_dir, **MUON), "fsdp": base / "fsdp"}
    p = ok(torchrun(out["fsdp"], shards_dir, **MUON, **{"run.dist": "fsdp"}))
    assert p.stdout.count("optimizer muon: 8 matrices") == 1 and "world size 2" in p.stdout
    return out


def test_fsdp_muon_equals_one_process_over_20_steps(runs):
    got, want = train_losses(runs["fsdp"]), train_losses(runs["single"])
    assert sorted(got) == list(range(STEPS))
    assert_close(got, want, range(STEPS), tol=TOL)


def test_fsdp_muon_resumes_bitwise(runs, shards_dir, tmp_path):
    resumed = tmp_path / "resumed"
    p = ok(torchrun(resumed, shards_dir, "--resume", str(step_dir(runs["fsdp"], HALF)), **MUON, **{"run.dist": "fsdp"}))
    assert f"at step {HALF}" in p.stdout
    got, want = train_losses(resumed), train_losses(runs["fsdp"])
    assert sorted(got) == list(range(HALF, STEPS))
    for s in got:
        assert got[s] == want[s], f"step {s}: {got[s]!r} != {want[s]!r}"


@pytest.mark.filterwarnings("ignore:resuming the RNG states")  # no dropout here: the masks do not matter
def test_fsdp_checkpoint_resumes_in_one_process(runs, shards_dir, tmp_path):
    """The full optimizer state gathered from the shards (the momentum buffers whole) continues in
    one process on the one-process trajectory."""
    res = train(C.resolve(None, list(overrides(tmp_path / "one", shards_dir, 8, **MUON).items())),
                resume=str(step_dir(runs["fsdp"], HALF)), progress=False)
    assert_close(res.losses, train_losses(runs["single"]), range(HALF, STEPS), tol=TOL)


def test_every_variant_under_fsdp_equals_one_process_and_resumes_bitwise(shards_dir, tmp_path):
    single = single_run(tmp_path / "single", shards_dir, **VARIANTS)
    fsdp = tmp_path / "fsdp"
    p = ok(torchrun(fsdp, shards_dir, **VARIANTS, **{"run.dist": "fsdp"}))
    assert "(ns polar_express, normuon, cautious wd, momentum warmup 4)" in p.stdout
    got = train_losses(fsdp)
    assert_close(got, train_losses(single), range(6), tol=TOL)
    # the variants' state is in the checkpoint, whole: NorMuon's per-neuron statistics and the step count
    state = ckpt.load_train_state(step_dir(fsdp, 3))["optimizer"]["state"]
    muon_states = [s for s in state.values() if "momentum_buffer" in s]
    assert len(muon_states) == 8 and all("normuon_v" in s and float(s["step"]) == 3 for s in muon_states)
    resumed = tmp_path / "resumed"
    ok(torchrun(resumed, shards_dir, "--resume", str(step_dir(fsdp, 3)), **VARIANTS, **{"run.dist": "fsdp"}))
    again = train_losses(resumed)
    assert sorted(again) == [3, 4, 5]
    for s in again:
        assert again[s] == got[s], f"step {s}: {again[s]!r} != {got[s]!r}"
