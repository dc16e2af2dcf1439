"""The modern model: shapes, causality, KV-cache decoding, rotary tables, every switch, the softcap
on both loss paths, export parity with transformers' Qwen3 / Llama, import back, checkpoints of
an untied head, and the CLI (train, resume bitwise, sample, eval) with model.arch modern."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import subprocess
import sys

import pytest
import torch

from gptforge import config as C
from gptforge.checkpoint import load_model, save_model
from gptforge.errors import GPTForgeError
from gptforge.interop.export import export_hf
from gptforge.interop.load import load_pretrained
from gptforge.loss import HeadLoss
from gptforge.model import GPT, RECIPES, GPTConfig, KVCache
from gptforge.sampling import generate

NANO = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)


def modern(**fields) -> GPTConfig:
    """GPTConfig of the modern recipe under `fields`."""
    return GPTConfig(**{**RECIPES["modern"], **fields})




def nano(seed: int = 0, std: float = 0.05, **overrides) -> GPT:
    """A nano modern model, weights perturbed off init (zero-init would make blocks identities)."""
    torch.manual_seed(seed)
    m = GPT(modern(**{**NANO, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def tokens(n: int, batch: int = 2, seed: int = 0, vocab: int = 50257) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# --- the model ------------------------------------------------------------------------------


def test_shapes_finiteness_and_names():
    m = nano()
    logits, loss = m(tokens(16), tokens(16, seed=1))
    assert logits.shape == (2, 16, 50257) and torch.isfinite(loss)
    assert logits.abs().max() < 15.0  # soft-capped
    names = dict(m.named_parameters())
    assert "transformer.wpe.weight" not in names and "lm_head.weight" in names
    assert m.lm_head.weight is not m.transformer.wte.weight  # untied
    assert not any(n.endswith(".bias") for n in names)  # no biases
    assert m.config.mlp_hidden == 192 and modern().mlp_hidden == 2048  # 8C/3 rounded to 64
    big = modern()  # SwiGLU at the 4x MLP's parameters, at GPT-2 124M's width
    assert 3 * big.n_embd * big.mlp_hidden == 2 * big.n_embd * 4 * big.n_embd


def test_zero_init_makes_blocks_identities():
    m = GPT(modern(**NANO))
    for block in m.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
    m2 = GPT(modern(**NANO, zero_init=False))
    assert m2.transformer.h[0].attn.c_proj.weight.abs().max() > 0


@pytest.mark.parametrize("attention", ["flash", "manual"])
def test_causality(attention):
    m = nano(attention=attention)
    x = tokens(20)
    y = x.clone()
    y[:, 12:] = (y[:, 12:] + 7) % 50257
    with torch.no_grad():
        a, b = m(x)[0], m(y)[0]
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("attention", ["flash", "manual"])
@pytest.mark.parametrize("rope", [True, False])
def test_kv_cache_decode_equals_full_recompute(attention, rope):
    """A prefix, a chunk after it, then single tokens: the rotary positions continue past the cache."""
    m = nano(attention=attention, rope=rope)
    x = tokens(24)
    cache = KVCache(m.config, batch_size=2)
    with torch.no_grad():
        full = m(x)[0]
        parts = [m(x[:, :9], kv_cache=cache)[0], m(x[:, 9:15], kv_cache=cache)[0]]
        parts += [m(x[:, t : t + 1], kv_cache=cache)[0] for t in range(15, 24)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


# nanochat's techniques, each alone and all at once (nanochat's recipe on gptforge's model)
NANOCHAT = [dict(norm_gain=False), dict(embed_norm=True), dict(value_embeds="alternate"), dict(value_embeds="all"),
            dict(resid_lambdas=True), dict(x0_lambdas=True), dict(smear=True), dict(backout=True),
            dict(norm_gain=False, embed_norm=True, value_embeds="alternate", resid_lambdas=True, x0_lambdas=True,
                 smear=True, backout=True, mlp="relu2", softcap=15.0)]


@pytest.mark.parametrize("switch", NANOCHAT, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_kv_cache_decode_equals_full_recompute_with_each_technique(switch):
    """The smear reads the previous token across decode steps (KVCache.last_embedding); value
    embeddings, lambdas and backout are per position."""
    m = nano(n_layer=3, **switch)
    x = tokens(24)
    cache = KVCache(m.config, batch_size=2)
    with torch.no_grad():
        full = m(x)[0]
        parts = [m(x[:, :9], kv_cache=cache)[0], m(x[:, 9:15], kv_cache=cache)[0]]
        parts += [m(x[:, t : t + 1], kv_cache=cache)[0] for t in range(15, 24)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5
    a = generate(m, [464, 318, 257], 8, temperature=0, stop_at_eot=False)
    assert a == generate(m, [464, 318, 257], 8, temperature=0, stop_at_eot=False, use_cache=False)


def test_techniques_add_their_parameters_only_when_on():
    names = lambda **s: set(dict(nano(n_layer=3, **s).named_parameters()))
    base = names()
    assert names(value_embeds="alternate") - base == {
        "transformer.ve.0.weight", "transformer.ve.2.weight", "transformer.h.0.attn.ve_gate.weight",
        "transformer.h.2.attn.ve_gate.weight"}  # every other layer, ending at the last (nanochat's has_ve)
    assert len(names(value_embeds="all") - base) == 6
    assert names(resid_lambdas=True, x0_lambdas=True, backout=True) - base == {"resid_lambdas", "x0_lambdas", "backout_lambda"}
    assert names(smear=True) - base == {"transformer.smear.gate.weight", "transformer.smear.lam"}
    assert names(embed_norm=True) - base == {"transformer.ln_e.weight"}
    assert not any(n.endswith("norm.weight") or ".ln_" in n for n in names(norm_gain=False, embed_norm=True))
    m = GPT(modern(**{**NANO, "n_layer": 3}, resid_lambdas=True, x0_lambdas=True, backout=True, smear=True))
    assert torch.allclose(m.resid_lambdas, torch.tensor([1.15, 1.10, 1.05]))  # nanochat's init
    assert torch.allclose(m.x0_lambdas, torch.tensor([0.20, 0.125, 0.05])) and m.backout_lambda.item() == pytest.approx(0.2)
    assert m.transformer.smear.lam.item() == 0  # the smear starts as the identity


def test_muon_files_value_embeddings_as_embeddings_and_gates_as_matrices():
    from gptforge.training.optim import kind_of

    m = nano(value_embeds="all", resid_lambdas=True, smear=True)
    kinds = {n: kind_of(n, p) for n, p in m.named_parameters()}
    assert kinds["transformer.ve.0.weight"] == "embed" and kinds["transformer.h.0.attn.ve_gate.weight"] == "muon"
    assert kinds["resid_lambdas"] == "gain" and kinds["transformer.smear.lam"] == "gain"


def test_greedy_sampling_with_and_without_cache_agree():
    m = nano(softcap=15.0)  # the capped logits, as sampling sees them
    a = generate(m, [464, 318, 257], 12, temperature=0, stop_at_eot=False)
    b = generate(m, [464, 318, 257], 12, temperature=0, stop_at_eot=False, use_cache=False)
    assert a == b and len(a) == 12


@pytest.mark.parametrize("block_size", [17, 33, 100])
def test_rotary_tables_at_any_block_size(block_size):
    m = nano(block_size=block_size)
    rot = m.transformer.h[0].attn.rotary
    D = m.config.head_dim
    assert rot.cos.shape == (block_size, D) and rot.cos.dtype == torch.float32
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).double() / D))
    ang = torch.arange(block_size).double()[:, None] * inv[None]  # (T, D/2), independent of the module
    assert torch.allclose(rot.cos.double(), torch.cat([ang.cos(), ang.cos()], 1), atol=2e-5)  # fp32 angles
    assert torch.allclose(rot.sin.double(), torch.cat([ang.sin(), ang.sin()], 1), atol=2e-5)
    assert "rotary" not in " ".join(m.state_dict())  # non-persistent: never saved
    with torch.no_grad():
        assert m(tokens(block_size, batch=1))[0].shape == (1, block_size, 50257)
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        m(tokens(block_size + 1, batch=1))


SWITCHES = [dict(rope=False), dict(qk_norm=False), dict(norm="layernorm"), dict(mlp="relu2"), dict(mlp="gelu"),
            dict(tie_embeddings=True), dict(zero_init=False), dict(softcap=15.0), dict(bias=True, norm="layernorm"),
            dict(norm_gain=False), dict(norm_gain=False, norm="layernorm", bias=True), dict(embed_norm=True),
            dict(value_embeds="alternate"), dict(value_embeds="all"), dict(resid_lambdas=True), dict(x0_lambdas=True),
            dict(smear=True), dict(backout=True)]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_switch_builds_and_trains_a_step(switch):
    torch.manual_seed(0)
    m = GPT(modern(**{**NANO, **switch}))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x, y = tokens(16), tokens(16, seed=1)
    before = m(x, y)[1]
    before.backward()
    opt.step()
    opt.zero_grad()
    after = m(x, y)[1]
    assert torch.isfinite(before) and after < before
    if switch.get("tie_embeddings"):
        assert m.lm_head.weight is m.transformer.wte.weight
    if switch.get("rope") is False:
        assert "transformer.wpe.weight" in dict(m.named_parameters())


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_plain_and_fused_loss_paths_agree_with_softcap(softcap):
    """Same loss and gradients on both LM-head paths, the cap applied before the cross-entropy."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    w = (torch.randn(130, 16, generator=g) * 2).requires_grad_()
    t = torch.randint(0, 100, (2, 9))
    t[0, 3] = -1
    ref = torch.nn.functional.cross_entropy(
        (softcap * torch.tanh((x @ w.t())[..., :100] / softcap) if softcap else (x @ w.t())[..., :100]).reshape(-1, 100),
        t.reshape(-1), ignore_index=-1)
    gref = torch.autograd.grad(ref, (x, w))
    for head in (HeadLoss(), HeadLoss(path="fused", rows=5, block_rows=2)):
        loss = head(x, w, t, 100, softcap=softcap)[1]
        grads = torch.autograd.grad(loss, (x, w))
        assert torch.allclose(loss, ref, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, gref))
        per_token = HeadLoss(path=head.path, rows=5, block_rows=2, reduction="none")(x, w, t, 100, softcap=softcap)[1]
        assert torch.allclose(per_token[t != -1].mean(), ref, atol=1e-5)


def test_model_loss_paths_agree():
    m = nano()
    x, y = tokens(16), tokens(16, seed=1)
    plain = m(x, y)[1]
    m.head_loss = HeadLoss(path="fused", rows=7, block_rows=3)
    assert torch.allclose(m(x, y)[1], plain, atol=1e-5)


# --- config and dispatch -------------------------------------------------------------------------


def test_model_args_dispatch_and_errors():
    cfg = C.resolve(None, [("model.preset", "nano"), ("model.arch", "modern"), ("model.mlp", "relu2")])
    mc = cfg.model.gpt_config()
    assert mc.recipe == "modern" and mc.mlp == "relu2" and mc.bias is False and mc.n_embd == 64
    assert GPT(mc).config.mlp == "relu2"
    assert C.resolve(None, [("model.preset", "nano")]).model.gpt_config().recipe == "modern"  # the default
    gpt2 = C.resolve(None, [("model.preset", "nano"), ("model.arch", "gpt2")]).model.gpt_config()
    assert gpt2 == GPTConfig(**{**NANO, "block_size": 64}) and gpt2.recipe == "gpt2"
    assert C.resolve(None, [("model.arch", "gpt2"), ("model.rope", "true")]).model.gpt_config().rope  # any recipe, any switch
    with pytest.raises(GPTForgeError, match=r"model.arch must be one of gpt2, modern"):
        C.resolve(None, [("model.arch", "llama")])
    with pytest.raises(GPTForgeError, match=r"model.norm must be one of rmsnorm, layernorm"):
        C.resolve(None, [("model.arch", "modern"), ("model.norm", "batchnorm")])
    with pytest.raises(GPTForgeError, match=r"unknown model.arch 'mamba'"):
        GPTConfig.from_dict({"arch": "mamba"})


def test_modern_124m_config_parses():
    cfg = C.resolve("modern-124m", [])
    mc = cfg.model.gpt_config()
    assert mc.recipe == "modern" and (mc.n_layer, mc.n_head, mc.n_embd, mc.block_size) == (12, 12, 768, 1024)


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_keeps_the_untied_head(tmp_path):
    m = nano()
    save_model(m, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert GPTConfig.from_dict(meta["model"]) == m.config
    from safetensors.torch import load_file

    assert "lm_head.weight" in load_file(str(tmp_path / "ck" / "model.safetensors"))
    back = load_model(tmp_path / "ck")
    assert isinstance(back, GPT)
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)
    x = tokens(10)
    with torch.no_grad():
        assert torch.equal(back.eval()(x)[0], m(x)[0])
    tied = nano(tie_embeddings=True)
    save_model(tied, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    back_tied = load_model(tmp_path / "tied")
    assert back_tied.lm_head.weight is back_tied.transformer.wte.weight


# --- Hugging Face export / import ---------------------------------------------------------------


@pytest.mark.parametrize("qk_norm,kind", [(True, "Qwen3ForCausalLM"), (False, "LlamaForCausalLM")])
@pytest.mark.parametrize("tie", [False, True])
def test_export_parity_with_transformers(tmp_path, qk_norm, kind, tie):
    transformers = pytest.importorskip("transformers")
    m = nano(std=0.2, qk_norm=qk_norm, softcap=0.0, tie_embeddings=tie, pad_vocab=True)
    out = export_hf(m, tmp_path / "hf")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == [kind] and hf_cfg["tie_word_embeddings"] is tie
    assert hf_cfg["head_dim"] == 32 and hf_cfg["max_position_embeddings"] == 32 and hf_cfg["rms_norm_eps"] == 1e-6
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == kind
    x = tokens(32)
    with torch.no_grad():
        diff = (hf(x).logits - m(x)[0]).abs().max().item()
    assert diff <= 1e-4
    prompt = [464, 318, 257, 1332]
    ours = generate(m, prompt, 16, temperature=0, stop_at_eot=False)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, 4:].tolist()
    assert ours == theirs
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("def f():") == [4299, 277, 33529]
    back = load_pretrained(out)  # import-hf's reader: the same function
    assert isinstance(back, GPT) and back.config.qk_norm is qk_norm
    with torch.no_grad():
        assert (back(x)[0] - m(x)[0]).abs().max() < 1e-6


def test_export_of_what_no_hf_architecture_computes_is_our_modeling_file(tmp_path):
    out = export_hf(nano(mlp="relu2", softcap=15.0), tmp_path / "hf")  # parity: tests/test_remote_export.py
    assert json.loads((out / "config.json").read_text())["model_type"] == "gptforge"
    assert (out / "modeling_gptforge.py").is_file()


def test_import_hf_cli_round_trip(tmp_path):
    m = nano(softcap=0.0)
    export_hf(m, tmp_path / "hf")
    p = run_cli("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck"))
    assert p.returncode == 0, p.stderr
    back = load_model(tmp_path / "ck")
    assert isinstance(back, GPT)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    p = run_cli("export", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf2"))
    assert p.returncode == 0, p.stderr
    assert "Qwen3" in p.stderr
    capped = nano(softcap=15.0)
    save_model(capped, tmp_path / "capped")
    p = run_cli("export", str(tmp_path / "capped"), "--to-hf", str(tmp_path / "hf3"))
    assert p.returncode == 0 and "trust_remote_code" in p.stderr, p.stderr


# --- the CLI --------------------------------------------------------------------------------------


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_train_resume_bitwise_sample_eval(tmp_path, shards_dir):
    flags = ["--model.preset", "nano", "--model.arch", "modern", "--data.dir", str(shards_dir), "--data.seq_len=32",
             "--optim.batch_tokens", "128", "--optim.micro_batch_size", "4", "--run.device", "cpu",
             "--run.precision", "fp32", "--run.sample_tokens", "0", "--run.eval_every", "0", "--run.eval_tokens", "256",
             "--run.ckpt_every", "2", "--run.peak_tflops", "1", "--data.prefetch", "0"]
    full, half = tmp_path / "full", tmp_path / "half"
    p = run_cli("train", *flags, "--run.dir", str(full), "--run.max_steps", "4")
    assert p.returncode == 0, p.stderr
    p = run_cli("train", *flags, "--run.dir", str(half), "--run.max_steps", "2")
    assert p.returncode == 0, p.stderr
    p = run_cli("train", "--resume", "auto", "--run.dir", str(half), "--run.max_steps", "4")
    assert p.returncode == 0, p.stderr

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    assert losses(half) == losses(full) and sorted(losses(full)) == [0, 1, 2, 3]  # bitwise
    assert isinstance(load_model(full / "checkpoints" / "step_000004"), GPT)
    p = run_cli("sample", str(full), "--max-new-tokens", "8", "--seed", "1")
    assert p.returncode == 0, p.stderr
    p = run_cli("eval", str(full), "--data", str(shards_dir), "--max-tokens", "256")
    assert p.returncode == 0, p.stderr
    assert "loss" in p.stdout


def test_wrappings_from_outside_compute_the_same():
    """Activation checkpointing and torch.compile (aot_eager: the same graphs, no codegen) give the
    plain model's loss and gradients; bf16 autocast runs without a dtype mismatch."""
    import warnings

    from gptforge.training.distributed import apply_activation_checkpointing

    x, y = tokens(16), tokens(16, seed=1)
    ref = nano().train()
    loss = ref(x, y)[1]
    loss.backward()
    ckpt = nano().train()
    apply_activation_checkpointing(ckpt)
    l2 = ckpt(x, y)[1]
    l2.backward()
    assert torch.equal(l2, loss)
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in zip(ref.parameters(), ckpt.parameters()))
    compiled = torch.compile(nano(), backend="aot_eager")
    assert torch.allclose(compiled(x, y)[1], loss, atol=1e-5)
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error")  # e.g. "Mismatch dtype between input and weight"
        assert torch.isfinite(nano()(x, y)[1])


def test_activation_checkpointing_passes_the_value_embeddings():
    from gptforge.training.distributed import apply_activation_checkpointing

    switch = dict(value_embeds="all", smear=True, resid_lambdas=True, x0_lambdas=True, backout=True)
    x, y = tokens(16), tokens(16, seed=1)
    ref = nano(**switch).train()
    loss = ref(x, y)[1]
    loss.backward()
    ckpt = nano(**switch).train()
    apply_activation_checkpointing(ckpt)
    l2 = ckpt(x, y)[1]
    l2.backward()
    assert torch.equal(l2, loss)
    assert all(torch.allclose(a.grad, b.grad, atol=1e-6) for a, b in zip(ref.parameters(), ckpt.parameters()))


def test_shared_context_scoring_carries_the_smear():
    """Downstream scoring runs a shared context once into a KV cache and broadcasts it over the
    choices: the smear's predecessor goes with it, so the log-likelihoods are the full forward's."""
    from gptforge.device import Runtime
    from gptforge.eval.downstream import Row, _score_shared

    m = nano(smear=True, value_embeds="alternate")
    with torch.no_grad():
        m.transformer.smear.lam.fill_(1.0)  # a smear that matters
    ctx = tokens(10, batch=1)[0].tolist()
    rows = [Row(ctx, tokens(4, batch=1, seed=s)[0].tolist()) for s in (1, 2, 3)]
    with torch.no_grad():
        ll = _score_shared(m, rows, Runtime.make("cpu", "fp32"), False)[0]
        for r, got in zip(rows, ll):
            seq = torch.tensor([r.ctx + r.cont])
            logp = torch.log_softmax(m(seq)[0][0, len(r.ctx) - 1 : -1].double(), dim=-1)
            want = logp.gather(1, torch.tensor(r.cont)[:, None]).sum()
            assert abs(got.item() - want.item()) < 1e-4


def test_muon_groups_and_banner_with_every_technique():
    from gptforge.config import OptimArgs
    from gptforge.training.optim import describe, make_optimizer

    m = nano(value_embeds="alternate", resid_lambdas=True, x0_lambdas=True, smear=True, backout=True,
             embed_norm=True, norm_gain=False).train()
    args = OptimArgs(name="muon")
    opt = make_optimizer(m, args, torch.device("cpu"), name="muon")
    assert "wte + ve" in describe(opt, args)
    kinds = {n: g["kind"] for g in opt.param_groups for n in g["param_names"]}
    assert kinds["transformer.ve.1.weight"] == "embed" and kinds["x0_lambdas"] == "gain"
    x, y = tokens(16), tokens(16, seed=1)
    losses = []
    for _ in range(3):
        loss = m(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
