"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process loss trajectory,
resume is exact at the same and at another world size, and a crash on one rank ends the job.

Every distributed run is a real `torchrun --standalone --nproc_per_node 2 -m gptforge train`.
The single-process reference runs in this process with the same global batch (micro-batch 8
against 2 ranks x 4): the loader hands both exactly the same windows per micro-step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gptforge import config as C
from gptforge.training import checkpoint as ckpt
from gptforge.training.trainer import train

pytestmark = pytest.mark.slow

STEPS, HALF = 4, 2
TOL = 1e-5

# nano GPT, 32-token sequences; 512 tokens per step = 2 accumulation micro-steps of 8 sequences
# in all (so no_sync is exercised); shuffled data; a checkpoint mid-way
NANO = {
    "model.preset": "nano", "model.arch": "gpt2", "data.seq_len": "32", "data.prefetch": "0", "data.order": "shuffle",
    "optim.batch_tokens": "512", "optim.lr": "3e-3", "optim.warmup_steps": "2",
    "run.max_steps": str(STEPS), "run.ckpt_every": str(HALF), "run.device": "cpu", "run.precision": "fp32",
    "run.eval_every": "0", "run.eval_tokens": "1024", "run.sample_tokens": "4", "run.peak_tflops": "1.0",
}


def overrides(run_dir: Path, data_dir: Path, micro: int, **extra) -> dict:
    return {**NANO, "data.dir": str(data_dir), "run.dir": str(run_dir), "optim.micro_batch_size": str(micro),
            **{k: str(v) for k, v in extra.items()}}


def torchrun(run_dir: Path, data_dir: Path, *args: str, script: Path | None = None, timeout: float = 150,
             **extra) -> subprocess.CompletedProcess:
    """2 ranks of `gptforge train` with micro-batch 4 (the same global batch as one process with 8)."""
    flags = [a for k, v in overrides(run_dir, data_dir, 4, **extra).items() for a in (f"--{k}", v)]
    target = [str(script)] if script else ["-m", "gptforge"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *target, "train", *flags, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"
    return p


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in rows(run_dir):
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice: more than one rank writes metrics"
            out[r["step"]] = r["loss"]
    return out


def final_val(run_dir: Path) -> float:
    return [r["val_loss"] for r in rows(run_dir) if "val_loss" in r][-1]


def assert_close(got: dict[int, float], want: dict[int, float], steps, tol=TOL) -> None:
    for s in steps:
        assert math.isclose(got[s], want[s], rel_tol=0, abs_tol=tol), f"step {s}: {got[s]!r} vs {want[s]!r}"


def mid(run_dir: Path) -> Path:
    return ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(HALF)


# ------------------------------------------------------------------ runs shared by the tests
@pytest.fixture(scope="module")
def single(tmp_path_factory, shards_dir) -> Path:
    """The reference: one process, micro-batch 8 (= 2 ranks x 4)."""
    run = tmp_path_factory.mktemp("single") / "run"
    train(C.resolve(None, list(overrides(run, shards_dir, 8).items())), progress=False)
    return run


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, shards_dir) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    return run, ok(torchrun(run, shards_dir))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, shards_dir) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    return run, ok(torchrun(run, shards_dir, **{"run.dist": "fsdp"}))


# ------------------------------------------------------------------ tests
def test_ddp_equals_single_process(single, ddp):
    run, p = ddp
    want = train_losses(single)
    assert_close(train_losses(run), want, range(STEPS))
    assert abs(final_val(run) - final_val(single)) < TOL  # validation over disjoint shares, all-reduced
    # rank 0 alone prints and writes
    assert p.stdout.count("world size 2") == 1 and p.stdout.count("final val loss") == 1
    assert p.stdout.count("--- sample ---") == 1
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [HALF, STEPS]


def test_fsdp_equals_single_process(single, fsdp):
    run, p = fsdp
    assert_close(train_losses(run), train_losses(single), range(STEPS))
    assert abs(final_val(run) - final_val(single)) < TOL
    assert p.stdout.count("final val loss") == 1 and p.stdout.count("--- sample ---") == 1


def test_ddp_resumed_midway_equals_uninterrupted(ddp, shards_dir, tmp_path):
    run, _ = ddp
    resumed = tmp_path / "resumed"
    p = ok(torchrun(resumed, shards_dir, "--resume", str(mid(run))))
    assert f"resumed from {mid(run)} at step {HALF}" in p.stdout
    got, want = train_losses(resumed), train_losses(run)
    assert sorted(got) == list(range(HALF, STEPS))
    for s in got:
        assert got[s] == want[s], f"step {s}: {got[s]!r} != {want[s]!r}"  # same world size: bitwise
    assert final_val(resumed) == final_val(run)


def test_resume_at_another_world_size(single, ddp, fsdp, shards_dir, tmp_path):
    """Checkpoints hold the full state and a global data position: 2 -> 1 and 1 -> 2 ranks."""
    want = train_losses(single)
    # DDP (2 x 4) and FSDP (2 x 4) -> one process with micro-batch 8, and with 4 (4 accumulation steps)
    for name, (run, _), micro in (("ddp", ddp, 8), ("fsdp", fsdp, 8), ("ddp4", ddp, 4)):
        out = tmp_path / f"from_{name}_{micro}"
        res = train(C.resolve(None, list(overrides(out, shards_dir, micro).items())), resume=str(mid(run)), progress=False)
        assert sorted(res.losses) == list(range(HALF, STEPS)), name
        assert_close(res.losses, want, range(HALF, STEPS))
        assert abs(res.val_loss - final_val(single)) < TOL
    # one process -> 2 FSDP ranks: the full state is sharded on load
    out = tmp_path / "single_to_fsdp"
    ok(torchrun(out, shards_dir, "--resume", str(mid(single)), **{"run.dist": "fsdp"}))
    assert_close(train_losses(out), want, range(HALF, STEPS))


CRASH = """
    import os
    import sys

    import gptforge.model as M

    if os.environ.get("RANK") == "1":  # rank 1 fails in its 3rd forward: mid-run, inside a step
        forward, calls = M.GPT.forward, [0]

        def failing(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected failure on rank 1")
            return forward(self, *args, **kwargs)

        M.GPT.forward = failing

    from gptforge.cli import main

    sys.exit(main())
"""


def test_crash_on_rank1_ends_the_job(tmp_path, shards_dir):
    script = tmp_path / "crash_rank1.py"
    script.write_text(textwrap.dedent(CRASH))
    t0 = time.monotonic()
    p = torchrun(tmp_path / "run", shards_dir, script=script, timeout=120)
    assert p.returncode != 0
    assert "injected failure on rank 1" in p.stdout + p.stderr
    assert time.monotonic() - t0 < 90  # no hang: rank 0 was stopped, not left waiting in a collective
    assert ckpt.list_checkpoints(tmp_path / "run") == []


def test_eval_under_torchrun_equals_one_process(single, shards_dir):
    """`torchrun -m gptforge eval`: disjoint shares on 2 ranks, all-reduced, printed once."""
    ckpt_dir = ckpt.latest_checkpoint(single)
    args = ["eval", str(ckpt_dir), "--data", str(shards_dir), "--seq-len", "32", "--device", "cpu",
            "--precision", "fp32", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # the same global batch: one process x 8 sequences == 2 ranks x 4
    one = ok(subprocess.run([sys.executable, "-m", "gptforge", *args, "--batch-size", "8"],
                            capture_output=True, text=True, timeout=120, env=env))
    two = ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "gptforge", *args, "--batch-size", "4"], capture_output=True, text=True, timeout=150, env=env))

    def result(out: str) -> tuple[float, str]:
        lines = [line for line in out.splitlines() if line.startswith("val loss")]
        assert len(lines) == 1, out  # rank 0 alone reports
        return float(lines[0].split()[2]), lines[0].split("(")[1]  # loss, "N tokens)"

    (loss_two, tokens_two), (loss_one, tokens_one) = result(two.stdout), result(one.stdout)
    assert tokens_two == tokens_one and abs(loss_two - loss_one) < 1e-4


# ------------------------------------------------------------------ issue 12: activation checkpointing, micro-batch auto
def test_activation_checkpointing_under_ddp_and_fsdp(single, shards_dir, tmp_path):
    """Recomputed blocks inside DDP and inside FSDP2's per-block units: the same trajectory."""
    for mode in ("ddp", "fsdp"):
        run = tmp_path / mode
        p = ok(torchrun(run, shards_dir, **{"run.dist": mode, "run.activation_checkpointing": "true"}))
        assert p.stdout.count("activation checkpointing on") == 1
        assert_close(train_losses(run), train_losses(single), range(STEPS))


def test_micro_batch_auto_under_fsdp(single, shards_dir, tmp_path):
    """Both ranks agree on one size, a divisor of the per-rank batch of 512 / (32 x 2) = 8."""
    run = tmp_path / "auto"
    ok(torchrun(run, shards_dir, **{"run.dist": "fsdp", "optim.micro_batch_size": "auto"}))
    chosen = json.loads((run / "config.json").read_text())["resolved"]["micro_batch"]
    assert chosen["world_size"] == 2 and 8 % chosen["size"] == 0
    assert_close(train_losses(run), train_losses(single), range(STEPS))


def test_default_config_on_two_ranks(shards_dir, tmp_path):
    """The shipped default (the modern recipe, mini, Muon, 4096 tokens of 256, micro-batch auto) on
    2 ranks (DDP): 8 sequences per rank, where the old fixed 16 did not divide."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptforge",
           "train", "--data.dir", str(shards_dir), "--run.dir", str(run), "--run.device", "cpu", "--run.max_steps", "1",
           "--run.eval_tokens", "512", "--run.sample_tokens", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = ok(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env))
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["micro_batch_size"] == 0 and saved["model"]["preset"] == "mini"
    size = saved["resolved"]["micro_batch"]["size"]
    assert 8 % size == 0 and f"= {size} seqs x 256 tokens x 2 ranks x {8 // size} accumulation steps" in p.stdout


def test_init_from_under_fsdp_equals_one_process(single, shards_dir, tmp_path):
    """Every rank loads the same source weights before FSDP2 shards them."""
    src = ckpt.latest_checkpoint(single)
    one = train(C.resolve(None, list(overrides(tmp_path / "one", shards_dir, 8, **{"model.init_from": src}).items())),
                progress=False)
    assert one.losses[0] < train_losses(single)[0] - 0.5  # trained weights, not a random init
    run = tmp_path / "fsdp"
    ok(torchrun(run, shards_dir, **{"run.dist": "fsdp", "model.init_from": src}))
    assert_close(train_losses(run), one.losses, range(STEPS))


# ------------------------------------------------------------------ issue 17: the device / distributed defects
OOM_IN_BACKWARD = """
    import sys

    import torch

    import gptforge.model as M
    from gptforge.training import fit


    class SimulatedGPU:  # micro-batch auto's trial steps on the CPU, as on a GPU with memory to spare
        def name(self):
            return "simulated GPU"

        def total(self):
            return 1 << 40

        def reset_peak(self):
            pass

        def peak(self):
            return 1 << 30

        def release(self):
            pass


    fit.device_memory = lambda device: SimulatedGPU()


    class OutOfMemoryInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


    forward, armed = M.Block.forward, [True]


    def block_forward(self, x, kv_cache=None, ve=None):
        out = forward(self, x, kv_cache, ve)
        # the first block of the first trial (the whole per-rank batch of 8), on both ranks: backward
        # fails after the last block's backward has run and the first block has been gathered
        if armed[0] and torch.is_grad_enabled() and x.size(0) == 8:
            armed[0] = False
            out = OutOfMemoryInBackward.apply(out)
        return out


    M.Block.forward = block_forward
    from gptforge.cli import main

    sys.exit(main())
"""


def test_fsdp_out_of_memory_inside_a_trial_backward_leaves_no_trace(fsdp, shards_dir, tmp_path):
    """micro-batch auto under FSDP2: the first trial runs out of memory inside backward. FSDP's
    per-iteration state is reset (it used to stay set: every later step kept the parameters
    unsharded, and the weights copied back were shard-shaped), the next size fits, and the run
    is bitwise the one that never tried (2 ranks x 4, given)."""
    script = tmp_path / "oom_in_backward.py"
    script.write_text(textwrap.dedent(OOM_IN_BACKWARD))
    run = tmp_path / "run"
    ok(torchrun(run, shards_dir, script=script, **{"run.dist": "fsdp", "optim.micro_batch_size": "auto"}))
    chosen = json.loads((run / "config.json").read_text())["resolved"]["micro_batch"]
    assert chosen["size"] == 4 and "(8 ran out of memory)" in chosen["reason"], chosen
    got, want = train_losses(run), train_losses(fsdp[0])
    for s in range(STEPS):
        assert got[s] == want[s], f"step {s}: {got[s]!r} != {want[s]!r}"
    assert final_val(run) == final_val(fsdp[0])


def test_each_rank_has_its_own_rng_saved_and_restored_by_rank(shards_dir, tmp_path):
    """Dropout under DDP: ranks are seeded apart (seed + rank: their own masks); each rank's
    generator state is saved, one per rank, and restored by rank (rank 0's state used to be saved
    and given to every rank). A resume is bitwise and ends with every rank's generator where the
    uninterrupted run's is; one process resuming the 2-rank checkpoint is told what it loses."""
    over = {"model.dropout": "0.1"}
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    ok(torchrun(run, shards_dir, **over))
    saved = ckpt.load_train_state(mid(run))["rng"]
    assert isinstance(saved, list) and len(saved) == 2
    assert not torch.equal(saved[0]["torch"], saved[1]["torch"])
    ok(torchrun(resumed, shards_dir, "--resume", str(mid(run)), **over))
    got, want = train_losses(resumed), train_losses(run)
    assert sorted(got) == list(range(HALF, STEPS)) and all(got[s] == want[s] for s in got), (got, want)
    end, end_resumed = (ckpt.load_train_state(ckpt.latest_checkpoint(r))["rng"] for r in (run, resumed))
    for rank in range(2):
        assert torch.equal(end[rank]["torch"], end_resumed[rank]["torch"]), rank
    with pytest.warns(UserWarning, match=r"RNG states of 2 rank\(s\) on 1: .*only without dropout"):
        res = train(C.resolve(None, list(overrides(tmp_path / "one", shards_dir, 8, **over).items())),
                    resume=str(mid(run)), progress=False)
    assert sorted(res.losses) == list(range(HALF, STEPS))


WRAPS = """
    import json

    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp_api

    from gptforge.model import GPT, preset
    from gptforge.sampling import generate
    from gptforge.training import distributed as distrib

    env = distrib.DistEnv.from_env()
    cpu = torch.device("cpu")
    distrib.init(env, cpu)
    out = {}


    def fresh():
        torch.manual_seed(0)  # the same weights on every rank
        return GPT(preset("nano", vocab_size=512))


    # sampling from an FSDP2-wrapped model: every rank runs the forwards; the text is one process's
    prompt = list(range(100, 108))
    want = generate(fresh(), prompt, 12, temperature=1.0, top_k=50, seed=0, stop_at_eot=False)
    sharded = distrib.wrap(fresh(), env, cpu, "fsdp")
    out["sample"] = [generate(sharded, prompt, 12, temperature=1.0, top_k=50, seed=0, stop_at_eot=False), want]

    # compile under FSDP2: each block compiled, in place, before it is sharded ("eager": cheap here)
    real, shards = fsdp_api.fully_shard, []


    def recording(module, **kwargs):
        shards.append([type(module).__name__, getattr(module, "_compiled_call_impl", None) is not None])
        return real(module, **kwargs)


    fsdp_api.fully_shard = recording
    compiled = distrib.wrap(fresh(), env, cpu, "fsdp", compile=True, compile_backend="eager")
    fsdp_api.fully_shard = real
    out["shards"] = shards
    out["same_keys"] = list(compiled.state_dict()) == list(fresh().state_dict())


    def steps(model, train_model, n=3):
        # bf16 autocast, as the trainer runs it; each rank its own batch, the same at every step
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1 + env.rank))
        losses, residual = [], set()
        for block in model.transformer.h:
            block.register_forward_hook(lambda m, args, o: residual.add(str(o.dtype).split(".")[-1]))
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, loss = train_model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / env.world_size)
        return {"losses": losses, "residual": sorted(residual)}


    plain = fresh()
    out["ddp"] = steps(plain, distrib.wrap(plain, env, cpu, "ddp"))
    fsdp = distrib.wrap(fresh(), env, cpu, "fsdp")
    out["fsdp"] = steps(fsdp, fsdp)
    out["fsdp_compiled"] = steps(compiled, compiled)
    if env.is_main:
        print("RESULT " + json.dumps(out))
    distrib.shutdown(env)
"""


def test_fsdp_sampling_compile_and_bf16_numerics(tmp_path):
    """On 2 ranks: sampling from an FSDP2 model (no_grad, not inference_mode) equals one process;
    wrap(compile=True) under FSDP2 compiles each block before sharding it, in place (the same
    state-dict keys) and trains as eagerly; and under bf16 autocast FSDP2 trains like DDP, the
    residual stream fp32 in both (no bf16 MixedPrecisionPolicy)."""
    script = tmp_path / "wraps.py"
    script.write_text(textwrap.dedent(WRAPS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = ok(subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env))
    out = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    got, want = out["sample"]
    assert got == want and len(got) == 12
    assert out["shards"] == [["Block", True], ["Block", True], ["GPT", False]], out["shards"]
    assert out["same_keys"]
    ddp, fsdp, compiled = out["ddp"], out["fsdp"], out["fsdp_compiled"]
    assert ddp["residual"] == fsdp["residual"] == ["float32"]
    for a, b, c in zip(ddp["losses"], fsdp["losses"], compiled["losses"]):
        assert abs(a - b) < 1e-5 and abs(b - c) < 1e-5, (ddp, fsdp, compiled)
    assert fsdp["losses"][-1] < fsdp["losses"][0]


VERIFY_LOGGED = """
    import os
    import sys

    from gptforge.data import verify

    real = verify.verify_shards


    def logged(*args, **kwargs):  # one line per verification: node, global rank, local rank, shards hashed
        report = real(*args, **kwargs)
        with open(os.environ["VERIFY_LOG"], "a") as f:
            f.write(f"{os.environ['GROUP_RANK']} {os.environ['RANK']} {os.environ['LOCAL_RANK']} {report['hashed']}\\n")
        return report


    verify.verify_shards = logged
    from gptforge.cli import main

    sys.exit(main())
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(run_dir: Path, data_dir: Path, tmp_path: Path, *args: str, timeout: float = 240) -> list[str]:
    """`torchrun --nnodes=2 --nproc_per_node=1` twice on this machine, as two nodes of one job
    (c10d rendezvous, loopback only, gloo over `lo`), each with its own gptforge cache as a machine
    of its own would have. Returns each node's verification log lines; rank 0's stdout is checked."""
    script = tmp_path / "verify_logged.py"
    script.write_text(textwrap.dedent(VERIFY_LOGGED))
    log = tmp_path / f"verify_{run_dir.name}.log"
    flags = [a for k, v in overrides(run_dir, data_dir, 4).items() for a in (f"--{k}", v)]
    port, procs = free_port(), []
    try:
        for node in (0, 1):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": "lo",
                   "GPTFORGE_CACHE": str(tmp_path / f"cache_node{node}"), "VERIFY_LOG": str(log)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=gptforge-{run_dir.name}",
                   f"--rdzv-conf=is_host={int(node == 0)}", "--local-addr=127.0.0.1", "--max-restarts=0",
                   str(script), "train", *flags, *args]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        ok(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    assert sum(out.count("world size 2") for out, _ in outs) == 1  # global rank 0 alone prints
    return log.read_text().splitlines()


def test_two_nodes_train_as_one_process_and_resume(single, shards_dir, tmp_path):
    """Two nodes of one process each: every node's LOCAL_RANK 0 verifies the shards (once per
    node: here each node hashes them all into its own cache), training equals one process, and
    a resume on two nodes is bitwise."""
    run = tmp_path / "run"
    lines = two_nodes(run, shards_dir, tmp_path)
    nodes = sorted(line.split() for line in lines)
    assert [n[:3] for n in nodes] == [["0", "0", "0"], ["1", "1", "0"]], lines  # node, rank, local rank 0
    assert all(int(n[3]) > 0 for n in nodes), lines  # each node hashed the shards itself
    assert_close(train_losses(run), train_losses(single), range(STEPS))
    assert abs(final_val(run) - final_val(single)) < TOL
    resumed = tmp_path / "resumed"
    lines = two_nodes(resumed, shards_dir, tmp_path, "--resume", str(mid(run)))
    assert sorted(line.split()[:2] for line in lines) == [["0", "0"], ["1", "1"]]
    assert all(line.split()[3] == "0" for line in lines), lines  # remembered: each node's cache
    got, want = train_losses(resumed), train_losses(run)
    assert sorted(got) == list(range(HALF, STEPS)) and all(got[s] == want[s] for s in got), (got, want)


# ------------------------------------------------------------------ issue 17: one gradient reduction per optimizer step
REDUCTIONS = """
    import json
    import sys

    import torch.distributed as dist

    from gptforge import config as C
    from gptforge.training import distributed as distrib
    from gptforge.training.trainer import Trainer

    reduced = [0]  # gradient elements sent to a reduction

    def counting(collective):  # FSDP2's reduce-scatter of the gradients (reduce_scatter_single in torch 2.13)
        def counted(*args, **kwargs):
            reduced[0] += (kwargs["input"] if "input" in kwargs else args[1]).numel()
            return collective(*args, **kwargs)
        return counted

    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))

    wrap = distrib.wrap

    def wrap_counted(*args, **kwargs):  # DDP reduces its buckets in C++: a comm hook that counts, then does the same
        model = wrap(*args, **kwargs)
        if hasattr(model, "register_comm_hook"):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                reduced[0] += bucket.buffer().numel()
                return allreduce_hook(state, bucket)
            model.register_comm_hook(None, hook)
        return model

    distrib.wrap = wrap_counted
    base = [tuple(a.split("=", 1)) for a in sys.argv[1:]]
    out = {}
    for mode, fused in (("ddp", "auto"), ("fsdp", "auto"), ("fsdp", "on")):  # fused: the device's skip on DTensors
        for micro in (8, 2):  # per rank: 1 and 4 micro-steps per optimizer step
            t = Trainer(C.resolve(None, base + [("run.dist", mode), ("optim.fused", fused),
                                                ("optim.micro_batch_size", str(micro))]), progress=False)
            reduced[0] = 0
            rows = [t.train_step() for _ in range(3)]
            out[f"{mode} {fused} {t.plan.grad_accum_steps}"] = {"per_step": reduced[0] / 3,
                                                                 "losses": [r["loss"] for r in rows]}
            out["params"] = t.model.num_params()
            t.loader.close()
            t.val_loader.close()
    if distrib.DistEnv.from_env().is_main:
        print("RESULT " + json.dumps(out))
    distrib.shutdown(distrib.DistEnv.from_env())
"""


def test_one_gradient_reduction_per_optimizer_step(shards_dir, tmp_path):
    """With 4 micro-steps per optimizer step the gradients are reduced once, as with 1: under DDP
    (which decides in forward) and under FSDP2 (which decides in backward, so the backward must run
    inside the no-sync scope too). Counted as gradient elements reduced per step: about the
    model's parameters (FSDP2 pads each shard group to the world size), never 4 times that."""
    script = tmp_path / "reductions.py"
    script.write_text(textwrap.dedent(REDUCTIONS))
    args = [f"{k}={v}" for k, v in overrides(tmp_path / "run", shards_dir, 8).items()
            if k not in ("optim.micro_batch_size", "run.max_steps")] + ["run.max_steps=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args], capture_output=True, text=True, timeout=300, env=env))
    out = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    params = out["params"]
    for mode in ("ddp auto", "fsdp auto", "fsdp on"):
        one, four = out[f"{mode} 1"], out[f"{mode} 4"]
        assert four["per_step"] == one["per_step"], (mode, four["per_step"], one["per_step"])
        assert params <= one["per_step"] < 1.01 * params, (mode, one["per_step"], params)
        ddp = out["ddp auto 4"]["losses"]
        for a, b, c in zip(four["losses"], one["losses"], ddp):  # k micro-batches of B == one of k*B; FSDP == DDP
            assert abs(a - b) <= TOL and abs(a - c) <= TOL, (mode, four["losses"], one["losses"], ddp)
