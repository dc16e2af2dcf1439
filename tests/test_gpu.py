"""The CUDA-only branches, one test each, asserting behaviour (`pytest -m gpu`; skipped without CUDA).

Precision (bf16 tracks fp32, fp16 + GradScaler and its skipped steps, tf32 on/off), torch.compile
(equal to eager, no recompiles after warm-up), fused AdamW, the pinned + prefetching loader,
resume with dropout (and each rank's own GPU generator), KV-cache decoding in bf16, DDP / FSDP2
over NCCL under torchrun (FSDP2 with per-block Inductor compile; bf16 losses as DDP's), evaluation
and HellaSwag against the CPU, and the memory of the LM-head loss. Tiny models: seconds each on
an H100 (the compile test, about a minute). benchmarks/gpu_check.sh runs them.

Tolerances, and why:
- bf16 vs fp32 losses: 0.05 absolute per step at a loss of ~10 (bf16 keeps 8 mantissa bits).
- compile vs eager in fp32 (TF32 off): 1e-4: Inductor reorders and fuses reductions.
- fused vs for-each AdamW: 1e-6 relative: the same arithmetic, other kernels.
- DDP vs FSDP2 in bf16 (one GPU, manual attention): 1e-4: the same autocast numerics; only the
  gradient reduction differs.
- resume with dropout: bitwise with manual attention in deterministic mode; with flash attention
  1e-4, since the fused attention kernels' backward accumulates with atomics (not deterministic).
- eval CUDA vs CPU: 1e-4 in fp32 (TF32 off), 2e-2 under bf16 autocast.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptforge import config as C
from gptforge.device import Runtime
from gptforge.loss import HeadLoss
from gptforge.model import GPT, KVCache, preset
from gptforge.training import checkpoint as ckpt
from gptforge.training.trainer import Trainer, train
from helpers import randomize
from test_data_loader import make_dir
from test_train import small_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = {"run.device": "cuda"}


def cfg(tmp_path, shards_dir, name="run", **overrides) -> C.TrainConfig:
    """test_train's nano run (32-token sequences, 2 micro-steps of 4), on the GPU."""
    return small_cfg(tmp_path / name, shards_dir, **{**CUDA, **overrides})


def trainer(config) -> Trainer:
    return Trainer(config, progress=False)


def close(t: Trainer) -> None:
    t.report.close()
    t.loader.close()
    t.val_loader.close()


def losses_of(config, resume=None) -> dict[int, float]:
    return train(config, resume=resume, progress=False).losses


# ----------------------------------------------------------------------------- precision
def test_bf16_autocast_tracks_fp32(tmp_path, shards_dir):
    over = {"data.order": "sequential", "run.max_steps": 6, "run.ckpt_every": 0}
    fp32 = losses_of(cfg(tmp_path, shards_dir, "fp32", **over, **{"run.precision": "fp32"}))
    bf16 = losses_of(cfg(tmp_path, shards_dir, "bf16", **over, **{"run.precision": "bf16"}))
    assert fp32[0] == pytest.approx(math.log(50257), abs=0.6)
    for s in range(6):
        assert abs(bf16[s] - fp32[s]) < 0.05, (s, bf16[s], fp32[s])
    assert bf16[5] < bf16[0] - 0.5  # and it trains


def test_muon_under_fp16_grad_scaler_skips_overflows_and_compiles_in_bf16(tmp_path, shards_dir):
    """optim.name muon on CUDA: fp16's GradScaler unscales every group and an overflowing step
    leaves the weights, Muon's momentum and AdamW's step counts as they were (the host decides:
    Muon takes no found_inf); AdamW inside is fused there; bf16 + compile tracks eager bf16."""
    t = trainer(cfg(tmp_path, shards_dir, **{"optim.name": "muon", "run.precision": "fp16", "run.max_steps": 20}))
    try:
        assert t.optimizer.adamw.defaults["fused"] is True
        rows = [t.train_step() for _ in range(4)]
        assert all(math.isfinite(r["loss"]) for r in rows) and min(r["loss"] for r in rows[1:]) < rows[0]["loss"]
        snap = lambda: [p.detach().clone() for p in t.model.parameters()] + [  # noqa: E731
            s[k].clone() for s in t.optimizer.state.values() for k in ("momentum_buffer", "step") if k in s]
        before, scale = snap(), t.scaler.get_scale()
        hook = t.model.transformer.ln_f.weight.register_hook(lambda g: g * float("inf"))
        try:
            row = t.train_step()
        finally:
            hook.remove()
        assert not math.isfinite(row["grad_norm"]) and t.scaler.get_scale() == scale * 0.5
        assert all(torch.equal(a, b) for a, b in zip(before, snap()))
        t.train_step()
        assert any(not torch.equal(a, b) for a, b in zip(before, snap()))
    finally:
        close(t)
    over = {"optim.name": "muon", "run.precision": "bf16", "data.order": "sequential", "run.max_steps": 4, "run.ckpt_every": 0}
    eager = losses_of(cfg(tmp_path, shards_dir, "eager", **over))
    compiled = losses_of(cfg(tmp_path, shards_dir, "compiled", **over, **{"run.compile": "true"}))
    for s in range(4):
        assert abs(compiled[s] - eager[s]) < 0.05, (s, compiled[s], eager[s])
    assert eager[3] < eager[0]


def test_fp16_with_grad_scaler_trains_and_skips_overflowing_steps(tmp_path, shards_dir):
    t = trainer(cfg(tmp_path, shards_dir, **{"run.precision": "fp16", "run.max_steps": 20}))
    try:
        assert t.scaler.is_enabled() and t.rt.precision == "fp16"
        rows = [t.train_step() for _ in range(4)]
        assert all(math.isfinite(r["loss"]) for r in rows) and min(r["loss"] for r in rows[1:]) < rows[0]["loss"]
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        state_steps = [s["step"].clone() for s in t.optimizer.state.values()]
        scale = t.scaler.get_scale()
        hook = t.model.transformer.ln_f.weight.register_hook(lambda g: g * float("inf"))  # an overflow
        try:
            row = t.train_step()
        finally:
            hook.remove()
        assert not math.isfinite(row["grad_norm"]) and math.isfinite(row["loss"])
        assert t.scaler.get_scale() == scale * 0.5  # backed off
        for n, p in t.model.named_parameters():
            assert torch.equal(p, before[n]), f"{n} changed in a skipped step"
        assert all(torch.equal(s["step"], old) for s, old in zip(t.optimizer.state.values(), state_steps))
        after = t.train_step()  # and training goes on
        assert math.isfinite(after["grad_norm"])
        assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    finally:
        close(t)


def test_tf32_setting_changes_the_matmul_mode():
    """tf32: TF32 tensor cores for fp32 matmuls (10-bit mantissa); fp32: full precision."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs an Ampere or newer GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1024, 1024, device="cuda", generator=g)
    b = torch.randn(1024, 1024, device="cuda", generator=g)
    exact = a.double() @ b.double()
    errors = {}
    try:
        for mode in ("tf32", "fp32"):
            Runtime.make("cuda", mode)
            assert torch.backends.cuda.matmul.allow_tf32 is (mode == "tf32")
            assert torch.get_float32_matmul_precision() == ("high" if mode == "tf32" else "highest")
            errors[mode] = ((a @ b).double() - exact).abs().max().item()
    finally:
        Runtime.make("cuda", "fp32")
    assert errors["tf32"] > 20 * errors["fp32"], errors


# ----------------------------------------------------------------------------- the step's host syncs
@pytest.mark.parametrize("guard", ["off"])  # with the guard on, the host reads every step before its update
def test_steps_between_logging_steps_never_synchronize(tmp_path, shards_dir, monkeypatch, guard):
    """log_every 4 with fused AdamW (CUDA's default): the steps between logging steps queue their
    work without a single device sync (torch.cuda.set_sync_debug_mode("error") raises at any:
    .item(), torch.cuda.synchronize, a blocking copy); and the losses are those of a run that
    reads every step."""
    over = {"run.precision": "fp32", "data.order": "sequential", "optim.spike_guard": guard, "run.max_steps": 8}
    quiet = trainer(cfg(tmp_path, shards_dir, "quiet", **over, **{"run.log_every": 4}))
    every = trainer(cfg(tmp_path, shards_dir, "every", **over))
    syncs = []
    synchronize = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(quiet.step) or synchronize(*a))
    try:
        rows = [quiet.train_step() for _ in range(5)]  # 0..4; the first builds AdamW's state (blocking copies)
        for _ in range(3):  # 5, 6, 7
            torch.cuda.set_sync_debug_mode("error")
            try:
                rows.append(quiet.train_step())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert syncs == [0, 0, 4, 4] and all("loss" not in r for r in rows[5:])
        quiet.read_values()
        want = [every.train_step()["loss"] for _ in range(8)]
        assert [r["loss"] for r in rows] == pytest.approx(want, abs=1e-4)  # attention's backward: atomics
    finally:
        close(quiet)
        close(every)


# ----------------------------------------------------------------------------- compile
def test_compiled_training_equals_eager_and_never_recompiles_after_warm_up(tmp_path, shards_dir):
    """Over train steps, an evaluation, a sample, a checkpoint and more train steps: the same
    losses as eager, and dynamo compiles nothing new after the first two steps. The fused LM-head
    loss is a graph break by design; under compile its chunk is a compiled graph of its own."""
    import torch._dynamo

    over = {"run.precision": "fp32", "data.order": "sequential", "run.lm_head_loss": "fused", "run.max_steps": 8}
    eager = trainer(cfg(tmp_path, shards_dir, "eager", **over))
    compiled = trainer(cfg(tmp_path, shards_dir, "compiled", **over, **{"run.compile": True}))
    counters = torch._dynamo.utils.counters
    try:
        for _ in range(2):  # warm-up: compiles forward and backward
            assert compiled.train_step()["loss"] == pytest.approx(eager.train_step()["loss"], abs=1e-4)
        graphs = counters["stats"]["unique_graphs"]
        torch._dynamo.config.error_on_recompile = True
        try:
            for _ in range(2):
                assert compiled.train_step()["loss"] == pytest.approx(eager.train_step()["loss"], abs=1e-4)
            assert compiled.evaluate() == pytest.approx(eager.evaluate(), abs=1e-4)
            assert compiled.sample()  # the raw module: eval mode and back
            compiled.save()
            for _ in range(2):
                assert compiled.train_step()["loss"] == pytest.approx(eager.train_step()["loss"], abs=1e-4)
        finally:
            torch._dynamo.config.error_on_recompile = False
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        close(eager)
        close(compiled)
        torch._dynamo.reset()


def test_fused_adamw_equals_for_each_adamw():
    from gptforge.config import OptimArgs
    from gptforge.training.optim import make_optimizer

    models = [randomize(GPT(preset("nano"))).train().cuda() for _ in range(2)]
    opts = [make_optimizer(m, OptimArgs(fused=f, lr=1e-2), torch.device("cuda")) for m, f in zip(models, ("on", "off"))]
    assert opts[0].defaults.get("fused") is True and not opts[1].defaults.get("fused")
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(5):
        grads = [torch.randn(p.shape, device="cuda", generator=g) for p in models[0].parameters()]
        for m, opt in zip(models, opts):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- the loader
@pytest.mark.parametrize("order", ["sequential", "shuffle"])
def test_pinned_prefetching_loader_equals_the_cpu_loader_across_epochs_and_a_resume(tmp_path, order):
    from gptforge.data.loader import ShardLoader

    data = make_dir(tmp_path / "data")
    kw = dict(batch_size=8, seq_len=16, order=order, seed=3)
    cpu = ShardLoader(data, **kw)
    gpu = ShardLoader(data, device="cuda", prefetch=3, **kw)
    assert gpu._pin
    n = cpu.steps_per_epoch + 4  # across an epoch boundary
    want = [cpu.next_batch() for _ in range(n + 6)]
    try:
        for i in range(n):
            x, y = gpu.next_batch()
            assert x.is_cuda and y.is_cuda
            assert torch.equal(x.cpu(), want[i][0]) and torch.equal(y.cpu(), want[i][1]), i
        assert gpu.epoch == 1
        state = gpu.state_dict()
        resumed = ShardLoader(data, device="cuda", prefetch=2, **kw)
        resumed.load_state_dict(state)
        for i in range(n, n + 6):
            x, y = resumed.next_batch()
            assert torch.equal(x.cpu(), want[i][0]) and torch.equal(y.cpu(), want[i][1]), i
        resumed.close()
    finally:
        gpu.close()
        cpu.close()


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("attention", ["manual", "flash"])
def test_resume_with_dropout_on_cuda(tmp_path, shards_dir, attention):
    """CUDA RNG state restored: the dropout masks after a resume are the uninterrupted run's."""
    over = {"model.dropout": 0.1, "model.attention": attention, "run.precision": "fp32", "data.prefetch": 2}
    torch.use_deterministic_algorithms(True, warn_only=True)  # CUBLAS_WORKSPACE_CONFIG: see conftest
    try:
        full = losses_of(cfg(tmp_path, shards_dir, "full", **over))
        first = losses_of(cfg(tmp_path, shards_dir, "half", **over, **{"run.max_steps": 3}))
        cont = losses_of(cfg(tmp_path, shards_dir, "half", **over), resume="auto")
    finally:
        torch.use_deterministic_algorithms(False)
    assert sorted(first) == [0, 1, 2] and sorted(cont) == [3, 4, 5]
    for s in range(6):
        got = first.get(s, cont.get(s))
        if attention == "manual":
            assert got == full[s], f"step {s}: {got!r} != {full[s]!r}"  # bitwise
        else:
            assert got == pytest.approx(full[s], abs=1e-4), s


# ----------------------------------------------------------------------------- sampling
def test_kv_cache_greedy_equals_uncached_in_bf16_and_the_cache_is_bf16(monkeypatch):
    from gptforge import sampling as gen

    model = randomize(GPT(preset("nano"))).cuda()
    rt = Runtime(torch.device("cuda"), "bf16")
    dtypes = []

    class Recording(KVCache):
        def update(self, layer, k, v):
            dtypes.append((self.k[layer].dtype, k.dtype))
            return super().update(layer, k, v)

    monkeypatch.setattr(gen, "KVCache", Recording)
    prompt = list(range(100, 108))
    cached = gen.generate(model, prompt, 40, temperature=0, use_cache=True, stop_at_eot=False, runtime=rt)
    uncached = gen.generate(model, prompt, 40, temperature=0, use_cache=False, stop_at_eot=False, runtime=rt)
    assert dtypes and set(dtypes) == {(torch.bfloat16, torch.bfloat16)}  # stored as computed: no casts
    if cached != uncached:  # allowed only at a near-tie of the top two logits (bf16 rounding)
        i = next(j for j, (a, b) in enumerate(zip(cached, uncached)) if a != b)
        with torch.no_grad(), rt.autocast():
            logits, _ = model(torch.tensor([prompt + uncached[:i]], device="cuda"))
        top2 = logits[0, -1].float().topk(2).values
        assert (top2[0] - top2[1]).item() < 0.05, f"diverged at token {i} with a clear winner"
    sampled = gen.generate(model, prompt, 20, temperature=1.0, top_k=50, seed=0, stop_at_eot=False, runtime=rt)
    assert sampled == gen.generate(model, prompt, 20, temperature=1.0, top_k=50, seed=0, stop_at_eot=False, runtime=rt)


# ----------------------------------------------------------------------------- torchrun + NCCL
# torchrun with one GPU is world size 1, where gptforge does not wrap at all; this launcher makes
# it wrap and join an NCCL group anyway, so DDP and FSDP2 run their real code on one GPU
WORLD1 = """
    import sys
    from gptforge.training import distributed as distrib
    distrib.DistEnv.enabled = property(lambda self: True)
    if sys.argv[1] == "gather":
        import json
        import torch
        from gptforge import config as C
        from gptforge.training.trainer import Trainer
        t = Trainer(C.resolve(None, [tuple(a.split("=", 1)) for a in sys.argv[2:]]), progress=False)
        t.train_step()
        dev = t.rt.device
        out = {"fsdp": distrib.is_fsdp(t.model), "model_bytes": sum(p.numel() * 4 for p in t.model.parameters())}
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        states = {}
        for what, gather in (("model", lambda: distrib.full_model_state(t.model)),
                             ("optim", lambda: distrib.full_optimizer_state(t.model, t.optimizer))):
            torch.cuda.reset_peak_memory_stats(dev)
            states[what] = gather()
            torch.cuda.synchronize(dev)
            out[what + "_extra_peak"] = torch.cuda.max_memory_allocated(dev) - base
        out["retained"] = torch.cuda.memory_allocated(dev) - base
        tensors = list(states["model"].values()) + [v for s in states["optim"]["state"].values() for v in s.values()
                                                    if torch.is_tensor(v) and v.numel() > 1]  # step counters aside
        out["devices"] = sorted({str(v.device) for v in tensors})
        print(json.dumps(out))
        t.loader.close(); t.val_loader.close(); distrib.shutdown(t.env)
    else:
        from gptforge.cli import main
        sys.exit(main())
"""


def torchrun1(tmp_path, *args, timeout=240) -> subprocess.CompletedProcess:
    script = tmp_path / "world1.py"
    script.write_text(textwrap.dedent(WORLD1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def flags(config: C.TrainConfig) -> list[str]:
    return [f"--{sec}.{k}={v}" for sec, d in config.to_dict().items() for k, v in d.items() if v is not None]


@pytest.mark.parametrize("dist", ["ddp", "fsdp"])
def test_ddp_and_fsdp_over_nccl_save_and_resume(tmp_path, shards_dir, dist):
    over = {"run.precision": "fp32", "run.max_steps": 4, "run.ckpt_every": 2, "run.dist": dist, "data.order": "shuffle"}
    single = losses_of(cfg(tmp_path, shards_dir, "single", **over))
    full = cfg(tmp_path, shards_dir, "dist", **over)
    p = torchrun1(tmp_path, "train", *flags(full))
    assert "world size 1" in p.stdout
    run = tmp_path / "dist"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["loss"] for r in rows if "loss" in r}
    for s in range(4):
        assert got[s] == pytest.approx(single[s], abs=1e-5), s
    # resume the wrapped run from its step-2 checkpoint, in a fresh directory
    mid = ckpt.checkpoints_dir(run) / ckpt.step_dir_name(2)
    resumed = cfg(tmp_path, shards_dir, "resumed", **over)
    torchrun1(tmp_path, "train", *flags(resumed), "--resume", str(mid))
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    again = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(again) == [2, 3]
    for s in (2, 3):
        assert again[s] == pytest.approx(got[s], abs=1e-5), s


def test_fsdp_full_state_gather_is_offloaded_to_the_cpu(tmp_path, shards_dir):
    """The checkpoint's full state lands on the CPU tensor by tensor: the GPU never holds a
    second copy of the model (24 blocks, so the embedding is under half of the parameters)."""
    config = cfg(tmp_path, shards_dir, **{"model.preset": "mini", "model.n_layer": 24, "run.dist": "fsdp",
                                          "run.precision": "fp32", "optim.micro_batch_size": 8})
    args = [f"{sec}.{k}={v}" for sec, d in config.to_dict().items() for k, v in d.items() if v is not None]
    out = json.loads(torchrun1(tmp_path, "gather", *args).stdout.strip().splitlines()[-1])
    assert out["fsdp"] and out["devices"] == ["cpu"]
    assert out["retained"] <= 1 << 20, out  # nothing left behind on the GPU
    # never the whole model (or both Adam moments of it) on the GPU at once
    assert out["model_extra_peak"] < 0.6 * out["model_bytes"], out
    assert out["optim_extra_peak"] < 0.6 * 2 * out["model_bytes"], out


def _run_losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_fsdp_compiles_each_block_with_inductor_and_trains_as_eager(tmp_path, shards_dir):
    """run.compile under FSDP2: each block compiled (Inductor) before it is sharded, in place, so
    the checkpoint keeps the plain parameter names; the losses are eager's (fp32, TF32 off)."""
    from safetensors import safe_open

    over = {"run.precision": "fp32", "run.max_steps": 4, "run.ckpt_every": 0, "run.dist": "fsdp",
            "data.order": "sequential", "run.lm_head_loss": "fused"}
    eager = losses_of(cfg(tmp_path, shards_dir, "eager", **over))
    p = torchrun1(tmp_path, "train", *flags(cfg(tmp_path, shards_dir, "compiled", **over, **{"run.compile": True})),
                  timeout=420)
    assert "compile True" in p.stdout
    got = _run_losses(tmp_path / "compiled")
    for s in range(4):
        assert got[s] == pytest.approx(eager[s], abs=1e-4), s
    with safe_open(str(ckpt.latest_checkpoint(tmp_path / "compiled") / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "transformer.h.0.attn.c_attn.weight" in keys and not any("_orig_mod" in k for k in keys)


def test_fsdp_and_ddp_bf16_losses_agree(tmp_path, shards_dir):
    """bf16 autocast under FSDP2 and DDP: the same numerics (FSDP2 without a bf16
    MixedPrecisionPolicy, so its residual stream stays fp32 as DDP's). With the old policy the
    step-0 loss alone differed by ~3e-4 (measured on a CPU, 2 gloo ranks)."""
    over = {"run.precision": "bf16", "run.max_steps": 4, "run.ckpt_every": 0, "data.order": "sequential",
            "model.attention": "manual"}
    runs = {}
    for dist in ("ddp", "fsdp"):
        torchrun1(tmp_path, "train", *flags(cfg(tmp_path, shards_dir, dist, **over, **{"run.dist": dist})))
        runs[dist] = _run_losses(tmp_path / dist)
    for s in range(4):
        assert abs(runs["ddp"][s] - runs["fsdp"][s]) < 1e-4, (s, runs)


REAL_OOM_IN_BACKWARD = """
    import sys
    import torch
    import gptforge.model as M
    from gptforge.training import distributed as distrib
    distrib.DistEnv.enabled = property(lambda self: True)  # wrap at world size 1, as WORLD1 does

    class AllocateTooMuch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return torch.empty(1 << 50, dtype=torch.uint8, device=grad.device)  # a real CUDA OOM

    forward, armed = M.Block.forward, [True]

    def block_forward(self, x, kv_cache=None):
        out = forward(self, x, kv_cache)
        if armed[0] and torch.is_grad_enabled() and x.size(0) == 8:  # the first trial's first block
            armed[0] = False
            out = AllocateTooMuch.apply(out)
        return out

    M.Block.forward = block_forward
    from gptforge.cli import main
    sys.exit(main())
"""


def test_fsdp_recovers_from_a_real_oom_inside_a_trial_backward(tmp_path, shards_dir):
    """micro-batch auto under FSDP2 over NCCL: the first trial's backward runs out of memory;
    reset_iter_state reshards and clears FSDP's state, and the run equals one with the size given."""
    over = {"run.precision": "fp32", "run.max_steps": 3, "run.ckpt_every": 0, "run.dist": "fsdp",
            "model.attention": "manual", "data.order": "sequential"}
    script = tmp_path / "real_oom.py"
    script.write_text(textwrap.dedent(REAL_OOM_IN_BACKWARD))
    auto = cfg(tmp_path, shards_dir, "auto", **over, **{"optim.batch_tokens": 8 * 32, "optim.micro_batch_size": "auto"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
           "train", *flags(auto)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    chosen = json.loads((tmp_path / "auto" / "config.json").read_text())["resolved"]["micro_batch"]
    assert chosen["size"] == 4 and "(8 ran out of memory)" in chosen["reason"], chosen
    given = cfg(tmp_path, shards_dir, "given", **over, **{"optim.batch_tokens": 8 * 32, "optim.micro_batch_size": 4})
    torchrun1(tmp_path, "train", *flags(given))
    got, want = _run_losses(tmp_path / "auto"), _run_losses(tmp_path / "given")
    for s in range(3):
        assert got[s] == pytest.approx(want[s], abs=1e-6), s


def test_each_rank_saves_and_restores_its_own_gpu_generator():
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.manual_seed(1234)
    saved = ckpt.rng_state(dev)
    assert torch.equal(saved["cuda"], torch.cuda.get_rng_state(dev))
    drawn = torch.rand(4, device=dev)
    ckpt.restore_rng([saved], 0, 1, dev)
    assert torch.equal(torch.rand(4, device=dev), drawn)


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_and_hellaswag_on_cuda_match_the_cpu(tmp_path):
    from gptforge.eval.hellaswag import evaluate_hellaswag, render_example, score_endings, load_examples
    from gptforge.eval.perplexity import evaluate_loss
    from gptforge.tokenizer import Tokenizer
    from test_eval import FakeLoader, random_tokens, write_jsonl

    model = randomize(GPT(preset("nano")), std=0.05)
    loader = FakeLoader(random_tokens(20 * 64 + 1, 50257), batch_size=4, seq_len=64)
    cpu_rt = Runtime(torch.device("cpu"), "fp32")
    on_cpu = evaluate_loss(model, loader, cpu_rt)
    model.cuda()
    fp32 = evaluate_loss(model, loader, Runtime.make("cuda", "fp32"))
    bf16 = evaluate_loss(model, loader, Runtime.make("cuda", "bf16"))
    assert fp32["tokens"] == bf16["tokens"] == on_cpu["tokens"] == 20 * 64
    assert fp32["loss"] == pytest.approx(on_cpu["loss"], abs=1e-4)
    assert bf16["loss"] == pytest.approx(on_cpu["loss"], abs=2e-2)

    path = write_jsonl(tmp_path / "hs.jsonl", [
        {"ctx": "The cat sat on", "endings": ["the mat.", "a dog barked loudly", "quantum", "the the"], "label": 0},
        {"ctx": "She opened the door and", "endings": ["walked in.", "blue", "ran away fast", "of"], "label": 2},
        {"ctx": "In 1969, astronauts", "endings": ["landed on the moon.", "ate", "is", "went home"], "label": 0},
    ])
    cuda_rt = Runtime.make("cuda", "fp32")
    model_cpu = GPT(preset("nano"))
    model_cpu.load_state_dict(model.state_dict())
    assert evaluate_hellaswag(model, path, cuda_rt) == evaluate_hellaswag(model_cpu, path, cpu_rt)
    tok = Tokenizer()
    for ex in load_examples(path):
        tokens, mask = render_example(ex, tok, 64)
        on_gpu = score_endings(model, tokens, mask, cuda_rt)
        here = score_endings(model_cpu, tokens, mask, cpu_rt)
        for a, b in zip(on_gpu, here):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_lm_head_memory_on_cuda_does_not_grow_with_batch_x_seq_len_x_vocab():
    """max_memory_allocated: evaluation's per-token losses stay within one chunk's working set
    (its logits, their fp32 copy, one fp32 temporary: 10 bytes a logit) at B tokens as at 2B
    (B: a little over one chunk), where the plain path's fp32 (2B*T, V) logits alone would be
    2 x chunk and more; a fused training step over several chunks peaks at under half the plain
    path's."""
    from gptforge.measure import lm_head_chunks
    from gptforge.eval.perplexity import token_losses

    dev = torch.device("cuda")
    model = GPT(preset("nano", block_size=1024, pad_vocab=True)).to(dev)
    rt = Runtime.make("cuda", "bf16")
    rows, _ = lm_head_chunks(dev, 50304)
    chunk = rows * 50304 * 10  # a chunk's bf16 logits, their fp32 copy and one fp32 temporary
    T = 1024
    B = rows // T + 1  # B * T rows: one full chunk and part of another
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randint(0, 50257, (2 * B, T), device=dev, generator=g) for _ in range(2))

    def extra_peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(dev) - base

    with torch.no_grad():
        one = extra_peak(lambda: token_losses(model.eval(), x[:B], y[:B], rt))
        two = extra_peak(lambda: token_losses(model.eval(), x, y, rt))
    assert two < chunk + (256 << 20), (two, chunk)
    assert two - one < 64 << 20, (one, two)  # twice the tokens, the same peak
    assert two < 2 * B * T * 50257 * 4, (two, chunk)  # under the plain path's fp32 logits alone

    model.train()

    def step(fused: bool):
        model.head_loss = HeadLoss("fused" if fused else "plain", rows, rows)
        with rt.autocast():
            _, loss = model(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(True)  # warm-up
    fused = extra_peak(lambda: step(True))
    plain = extra_peak(lambda: step(False))  # 2B x 1024 tokens: ~20 GB on an 80 GB GPU
    assert fused < plain / 2, (fused, plain)


def test_compiled_lm_head_losses_equal_eager_and_the_plain_path_fits_its_estimate():
    """The 124M head (C 768, V 50257 padded to 50304) in bf16 under Inductor: the fused path's
    compiled chunks (three chunk sizes' worth of rows) and the plain path's compiled cross-entropy
    are as close to the fp32 loss and gradients as the eager chunked loop; the compiled plain
    path's extra peak memory stays within what measure.choose_lm_head_loss assumes
    (PLAIN_LOGIT_COPIES bf16 logits), and the fused path's within about one chunk."""
    from gptforge.measure import PLAIN_LOGIT_COPIES

    dev = torch.device("cuda")
    N, C, V, VP = 16 * 1024, 768, 50257, 50304
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, C, device=dev, generator=g)
    w = torch.randn(VP, C, device=dev, generator=g) * 0.05
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    t[::9] = -1
    rows = 6000  # chunks of 6000, 6000 and 4384 rows

    def run(head, dtype=torch.bfloat16):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            _, loss = head(xg.view(1, N, C), wg, t.view(1, N), V)
        loss.backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated(dev) - base - (N * C + VP * C) * 4  # less the two fp32 grads
        return (loss.detach(), xg.grad, wg.grad), extra

    Runtime.make("cuda", "fp32")  # TF32 off for the reference
    ref, _ = run(HeadLoss("fused", rows, rows), dtype=None)
    Runtime.make("cuda", "bf16")
    eager, _ = run(HeadLoss("fused", rows, rows))

    def err(got):
        return [float((a.float() - b).norm() / b.norm()) for a, b in zip(got, ref)]

    budget = {"fused": 2 * rows * VP * 2 + (512 << 20), "plain": PLAIN_LOGIT_COPIES * N * VP * 2 + (512 << 20)}
    try:
        for path in ("fused", "plain"):
            head = HeadLoss(path, rows, rows, compiled=True)
            run(head)  # compiles
            got, extra = run(head)
            for e_got, e_eager in zip(err(got), err(eager)):
                assert e_got <= 1.5 * e_eager + 1e-3, (path, err(got), err(eager))
            assert extra <= budget[path], (path, extra / 2**30, budget[path] / 2**30)
    finally:
        Runtime.make("cuda", "fp32")  # TF32 off again, as the other tests expect
        torch._dynamo.reset()


def test_auto_runs_the_compiled_plain_loss_under_compile_and_trains_as_eager(tmp_path, shards_dir):
    """run.lm_head_loss auto on CUDA with compile: the plain logits with a compiled cross-entropy
    (the nano run's logits are far under a quarter of any GPU), said in the banner; its losses
    equal the eager run's (the chunked loop without compile)."""
    over = {"run.precision": "fp32", "data.order": "sequential", "run.max_steps": 4}
    eager = trainer(cfg(tmp_path, shards_dir, "eager", **over))
    compiled = trainer(cfg(tmp_path, shards_dir, "compiled", **over, **{"run.compile": True}))
    try:
        assert (eager.head_choice.path, eager.head_choice.compiled) == ("fused", False)
        assert (compiled.head_choice.path, compiled.head_choice.compiled) == ("plain", True)
        assert "LM-head loss plain, compiled (auto: plain with a compiled cross-entropy" in compiled.banner()
        for _ in range(3):
            assert compiled.train_step()["loss"] == pytest.approx(eager.train_step()["loss"], abs=1e-4)
    finally:
        close(eager)
        close(compiled)
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- Muon under FSDP2 over NCCL
MUON_VARIANTS = {"optim.muon_ns": "polar_express", "optim.muon_normuon": True, "optim.muon_cautious_wd": True,
                 "optim.muon_momentum_warmup": 2, "optim.muon_weight_decay": 0.1}


@pytest.mark.parametrize("variants", [False, True], ids=["default", "variants"])
def test_fsdp_muon_over_nccl_equals_one_process_and_resumes_bitwise(tmp_path, shards_dir, variants):
    """The CUDA twin of tests/test_fsdp_muon.py on one GPU (world size 1, forced to wrap): Muon's
    update through the DTensor path (gather, orthogonalize, keep the shard) follows the plain run,
    and its checkpoint (momentum and the variants' state) resumes bitwise."""
    over = {"optim.name": "muon", "run.precision": "fp32", "run.max_steps": 6, "run.ckpt_every": 3,
            "data.order": "shuffle", **(MUON_VARIANTS if variants else {})}
    single = losses_of(cfg(tmp_path, shards_dir, "single", **over))
    torchrun1(tmp_path, "train", *flags(cfg(tmp_path, shards_dir, "fsdp", **over, **{"run.dist": "fsdp"})))
    got = _run_losses(tmp_path / "fsdp")
    for s in range(6):
        assert got[s] == pytest.approx(single[s], abs=1e-5), s
    mid = ckpt.checkpoints_dir(tmp_path / "fsdp") / ckpt.step_dir_name(3)
    torchrun1(tmp_path, "train", *flags(cfg(tmp_path, shards_dir, "resumed", **over, **{"run.dist": "fsdp"})), "--resume", str(mid))
    again = _run_losses(tmp_path / "resumed")
    assert sorted(again) == [3, 4, 5] and all(again[s] == got[s] for s in again), (again, got)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_muon_on_two_gpus_follows_one_process_and_resumes_bitwise(tmp_path, shards_dir):
    """2 ranks over NCCL, each matrix sharded in two: the one-GPU trajectory within Newton-Schulz's
    bf16 noise (tests/test_fsdp_muon.py: the gradients are summed in another order), bitwise resume."""
    over = {"optim.name": "muon", "run.precision": "fp32", "run.max_steps": 6, "run.ckpt_every": 3,
            "data.order": "shuffle", **MUON_VARIANTS}
    single = losses_of(cfg(tmp_path, shards_dir, "single", **over))

    def two(name, *extra):
        args = flags(cfg(tmp_path, shards_dir, name, **over, **{"run.dist": "fsdp", "optim.micro_batch_size": 2}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gptforge",
               "train", *args, *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        return _run_losses(tmp_path / name)

    got = two("fsdp")
    for s in range(6):
        assert got[s] == pytest.approx(single[s], abs=3e-4), s
    again = two("resumed", "--resume", str(ckpt.checkpoints_dir(tmp_path / "fsdp") / ckpt.step_dir_name(3)))
    assert sorted(again) == [3, 4, 5] and all(again[s] == got[s] for s in again), (again, got)
