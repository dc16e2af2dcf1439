"""The GPT-2 model: parity with transformers, attention variants, causality, tying, sizes, loss at
init, padded vocabulary, KV-cache decoding, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from gptforge.checkpoint import load_model, save_model, write_sums
from gptforge.errors import GPTForgeError
from gptforge.sampling import generate
from gptforge.interop.export import export_hf
from gptforge.interop.load import load_pretrained
from gptforge.loss import HeadLoss
from gptforge.model import GPT, GPTConfig, KVCache, preset
from helpers import randomize

TINY = dict(block_size=32, vocab_size=50257, n_layer=2, n_head=4, n_embd=32)




def tiny(seed: int = 0, **overrides) -> GPT:
    return randomize(GPT(GPTConfig(**{**TINY, **overrides})), seed)


def tokens(n: int, batch: int = 2, seed: int = 0, vocab: int = 50257) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# --- parity with transformers ---------------------------------------------------------------


def hf_model(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_positions=kw.get("block_size", 32), n_embd=32, n_layer=2, n_head=4, vocab_size=50257,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return randomize(transformers.GPT2LMHeadModel(cfg), seed=1)


@pytest.mark.parametrize("attention", ["flash", "manual"])
def test_parity_hf_to_gptforge(tmp_path, attention):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf", attention=attention)
    x = tokens(32)
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[0]).abs().max().item()
    assert diff <= 1e-4


def test_parity_gptforge_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = tiny()
    export_hf(ours, tmp_path / "out")
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = tokens(32)
    with torch.no_grad():
        diff = (hf.eval()(x).logits - ours(x)[0]).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("variant", [dict(pad_vocab=True), dict(bias=False)])
def test_export_parity_of_variants(tmp_path, variant):
    """A padded vocabulary is exported unpadded; a model without biases as zero biases."""
    transformers = pytest.importorskip("transformers")
    ours = tiny(**variant)
    export_hf(ours, tmp_path / "out")
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.transformer.wte.weight.shape == (50257, 32)
    x = tokens(16)
    with torch.no_grad():
        assert (hf.eval()(x).logits - ours(x)[0]).abs().max().item() <= 1e-4


# --- the architecture -------------------------------------------------------------------------


def test_flash_equals_manual():
    flash = tiny(attention="flash")
    manual = GPT(GPTConfig(**TINY, attention="manual")).eval()
    manual.load_state_dict(flash.state_dict())
    x = tokens(32)
    with torch.no_grad():
        torch.testing.assert_close(flash(x)[0], manual(x)[0], atol=1e-5, rtol=1e-5)
        # and a chunk after a cached prefix (the explicit-mask path of flash attention)
        for model in (flash, manual):
            cache = KVCache(model.config, 2)
            first, _ = model(x[:, :20], kv_cache=cache)
            rest, _ = model(x[:, 20:], kv_cache=cache)
            torch.testing.assert_close(torch.cat([first, rest], 1), flash(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["flash", "manual"])
def test_causality(attention):
    model = tiny(attention=attention)
    x = tokens(32, batch=1)
    with torch.no_grad():
        base, _ = model(x)
        for t in (0, 10, 30):
            y = x.clone()
            y[0, t + 1] = (y[0, t + 1] + 1) % 50257
            changed, _ = model(y)
            torch.testing.assert_close(changed[:, : t + 1], base[:, : t + 1], atol=0, rtol=0)
            assert not torch.allclose(changed[:, t + 1], base[:, t + 1])


def test_tied_weights_share_storage(tmp_path):
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    save_model(model, tmp_path / "ck")
    for loaded in (load_model(tmp_path / "ck"), load_pretrained(tmp_path / "ck")):
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
        torch.testing.assert_close(loaded.lm_head.weight, model.transformer.wte.weight)


def test_gpt2_preset_parameter_count():
    with torch.device("meta"):  # no memory, no init
        model = GPT(preset("gpt2"))
    assert model.num_params() == 124_439_808


def test_loss_at_init_is_uniform():
    torch.manual_seed(0)
    model = GPT(preset("nano"))
    x, y = tokens(64, batch=4, seed=1), tokens(64, batch=4, seed=2)
    with torch.no_grad():
        logits, loss = model(x, y)
    assert logits.shape == (4, 64, 50257)
    assert abs(loss.item() - math.log(50257)) < 0.5


def test_padded_vocab_same_loss_and_never_sampled():
    plain = tiny()
    padded = GPT(GPTConfig(**TINY, pad_vocab=True)).eval()
    assert padded.transformer.wte.weight.shape[0] == 50304
    with torch.no_grad():
        state = plain.state_dict()
        wte = padded.transformer.wte.weight
        wte[:50257] = state["transformer.wte.weight"]
        wte[50257:] = 50.0  # padded rows that would win every argmax if they were not sliced off
        padded.load_state_dict({k: v for k, v in state.items() if "wte" not in k and "lm_head" not in k}, strict=False)
        x, y = tokens(32, seed=3), tokens(32, seed=4)
        y[0, :5] = -1  # ignore_index
        lp, loss_plain = plain(x, y)
        lq, loss_padded = padded(x, y)
    assert lq.shape[-1] == 50257
    torch.testing.assert_close(loss_padded, loss_plain)
    torch.testing.assert_close(lq, lp)
    out = generate(padded, [1, 2, 3], 25, temperature=2.0, seed=0, stop_at_eot=False)
    assert len(out) == 25 and max(out) < 50257


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["flash", "manual"])
def test_kv_cache_greedy_equals_uncached(attention):
    model = randomize(GPT(preset("nano", attention=attention)))
    prompt = tokens(8, batch=1)[0].tolist()
    cached = generate(model, prompt, 50, temperature=0, use_cache=True, stop_at_eot=False)
    uncached = generate(model, prompt, 50, temperature=0, use_cache=False, stop_at_eot=False)
    assert len(cached) == 50
    assert cached == uncached


def test_seeded_sampling_is_deterministic():
    model = randomize(GPT(preset("nano")))
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, stop_at_eot=False)
    a = generate(model, [464], 30, seed=123, **kw)
    b = generate(model, [464], 30, seed=123, **kw)
    c = generate(model, [464], 30, seed=124, **kw)
    d = generate(model, [464], 30, seed=123, use_cache=False, **kw)
    assert a == b == d
    assert a != c


def test_context_overflow_is_cropped_not_an_error():
    model = randomize(GPT(preset("nano")))  # block_size 64
    long_prompt = tokens(100, batch=1)[0].tolist()
    cached = generate(model, long_prompt, 40, temperature=0, stop_at_eot=False)
    uncached = generate(model, long_prompt, 40, temperature=0, use_cache=False, stop_at_eot=False)
    assert len(cached) == 40 and cached == uncached
    near_full = long_prompt[:60]  # crosses block_size mid-generation: the cache is rebuilt
    assert generate(model, near_full, 20, temperature=0, stop_at_eot=False) == generate(
        model, near_full, 20, temperature=0, use_cache=False, stop_at_eot=False
    )


# --- bad input --------------------------------------------------------------------------------


def test_unknown_preset():
    with pytest.raises(GPTForgeError, match=r"unknown model preset 'gpt3'.*nano"):
        preset("gpt3")


def test_invalid_config_names_the_field():
    with pytest.raises(GPTForgeError, match=r"n_embd \(50\) must be divisible by model.n_head \(4\)"):
        GPTConfig(n_embd=50, n_head=4).validate()


def test_mismatched_checkpoint_shapes(tmp_path):
    save_model(GPT(preset("nano")), tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"]["n_embd"] = 32  # the weights say 64
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GPTForgeError, match=r"config\.json: sha256 is"):  # an edit the sums do not know of
        load_model(tmp_path / "ck")
    write_sums(tmp_path / "ck")  # edited on purpose, sums and all: the shapes are still checked
    for load in (load_model, load_pretrained):
        with pytest.raises(GPTForgeError, match=r"tensor transformer\.\S+ has shape \(\d+, 64\).*expects \(\d+, 32\)"):
            load(tmp_path / "ck")


def test_over_long_sequence():
    model = GPT(preset("nano"))
    with pytest.raises(ValueError, match="length 65 exceeds the model's block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# --- the fused head + loss used for training (gptforge.loss, HeadLoss("fused")) -------------


def head_grads(model, x, y, dtype=None, head_loss=HeadLoss()):
    """Loss and every parameter's gradient of one forward/backward (under autocast to dtype)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits, loss = model(x, y, head_loss=head_loss)
    (loss / 2).backward()  # a loss scaled as accumulation does
    assert (logits is None) == (head_loss.path == "fused")
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pad_vocab", [False, True])
@pytest.mark.parametrize("rows,block_rows", [(0, 0), (7, 3), (40, 0)])
def test_fused_loss_equals_plain_loss_and_gradients(pad_vocab, rows, block_rows):
    """The fused path: the same loss and the same gradients as logits + F.cross_entropy
    (ignored targets, padded vocabulary), in one chunk or in several chunks and blocks."""
    model = tiny(pad_vocab=pad_vocab).train()
    x, y = tokens(32, batch=3, seed=5), tokens(32, batch=3, seed=6)
    y[0, :7] = -1
    loss_a, grads_a = head_grads(model, x, y)
    loss_b, grads_b = head_grads(model, x, y, head_loss=HeadLoss("fused", rows, block_rows))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    if pad_vocab:  # padded rows of the tied embedding are never predicted: no gradient from the head
        assert grads_b["transformer.wte.weight"][50257:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_loss_under_autocast_is_as_accurate_as_the_plain_path(dtype):
    """Under bf16 autocast (gradients made in forward) and fp16 (recomputed in backward, after
    the scale is known) the fused loss is no further from the fp32 result than the plain path."""
    model = tiny(pad_vocab=True).train()
    x, y = tokens(32, batch=3, seed=5), tokens(32, batch=3, seed=6)
    y[0, :7] = -1
    loss_ref, grads_ref = head_grads(model, x, y)
    loss_plain, grads_plain = head_grads(model, x, y, dtype)
    loss_fused, grads_fused = head_grads(model, x, y, dtype, HeadLoss("fused", 40, 16))
    assert abs(loss_fused - loss_ref) <= 2 * abs(loss_plain - loss_ref) + 1e-3
    for name, ref in grads_ref.items():
        err_plain = (grads_plain[name] - ref).norm() / ref.norm()
        err_fused = (grads_fused[name] - ref).norm() / ref.norm()
        assert err_fused <= 1.5 * err_plain + 1e-3, (name, float(err_fused), float(err_plain))
    assert grads_fused["transformer.wte.weight"][50257:].abs().max() == 0


def test_fused_loss_in_fp16_keeps_small_gradients_when_the_loss_is_scaled():
    """fp16 as GradScaler runs it: a loss scaled by 2**16 gives gradients 2**16 times the fp32
    ones, in every row of the head (the fp16 path recomputes the logits in backward and scales
    before casting, as the plain path does)."""
    model = tiny(pad_vocab=True).train()
    x, y = tokens(32, batch=3, seed=5), tokens(32, batch=3, seed=6)
    _, grads_ref = head_grads(model, x, y)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        _, loss = model(x, y, head_loss=HeadLoss("fused", 40))
    (loss * 2**16).backward()
    ref = grads_ref["transformer.wte.weight"][:50257] * 2 * 2**16  # head_grads halved the loss
    got = model.transformer.wte.weight.grad[:50257]
    assert (got != 0).float().mean() > 0.99  # rows of tokens never seen still get softmax gradients
    assert (got - ref).norm() / ref.norm() < 0.05


def test_per_token_losses_equal_plain_cross_entropy():
    """reduction "none", on both paths: the (B, T) losses of logits + F.cross_entropy, 0 where ignored."""
    import torch.nn.functional as F

    model = tiny(pad_vocab=True)
    x, y = tokens(32, batch=3, seed=5), tokens(32, batch=3, seed=6)
    y[1, 3:9] = -1
    with torch.no_grad():
        logits, _ = model(x)
        want = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction="none")
        for path, rows, block_rows in (("fused", 0, 0), ("fused", 5, 2), ("fused", 1000, 0), ("plain", 0, 0)):
            _, got = model(x, y, head_loss=HeadLoss(path, rows, block_rows, reduction="none"))
            assert got.shape == (3, 32) and got.dtype == torch.float32
            torch.testing.assert_close(got, want.view(3, 32), rtol=1e-5, atol=1e-5)
            assert (got[1, 3:9] == 0).all()


def test_the_head_loss_is_chosen_at_construction_or_per_forward():
    """No attribute is swapped into the model from outside: its builder passes the head loss to
    the constructor (or training.distributed.wrap gives it to the raw model before wrapping), and
    a forward may pass another (evaluation's per-token losses)."""
    import gptforge.loss as L

    config = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)
    model = GPT(config, head_loss=HeadLoss("fused"))
    x, y = tokens(16, batch=2, seed=1, vocab=64), tokens(16, batch=2, seed=2, vocab=64)
    logits, loss = model(x, y)
    assert logits is None and loss.shape == ()
    logits, per_token = model(x, y, head_loss=HeadLoss("plain", reduction="none"))
    assert logits.shape == (2, 16, 64) and per_token.shape == (2, 16)
    assert model.head_loss == HeadLoss("fused")  # a forward's choice does not stay
    assert not any(hasattr(L, name) for name in ("set_head_loss", "use", "unwrap", "softcap", "cap_logits"))
