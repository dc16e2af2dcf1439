"""Sampling: the sampler's filters, stopping at <|endoftext|>, batches, streaming text that never
prints half a character, autocast, and `gptforge sample` on checkpoints and run directories."""

from __future__ import annotations

import torch
import pytest

from gptforge import cli
from gptforge.checkpoint import save_model
from gptforge.device import Runtime
from gptforge.errors import GPTForgeError
from gptforge.sampling import TextDecoder, generate, generate_batch, sample_next, stream
from gptforge.model import GPT, preset
from gptforge.tokenizer import EOT_ID, Tokenizer
from helpers import randomize




@pytest.fixture(scope="module")
def model() -> GPT:
    return randomize(GPT(preset("nano")))


def eot_model() -> GPT:
    """A model whose every prediction is <|endoftext|>: the final LayerNorm outputs a constant
    vector b, and EOT's embedding row is 10 * b."""
    m = randomize(GPT(preset("nano")))
    with torch.no_grad():
        b = torch.randn(m.config.n_embd, generator=torch.Generator().manual_seed(5))
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(b)
        m.transformer.wte.weight[EOT_ID] = 10 * b
    return m


# --- the sampler ------------------------------------------------------------------------------


def test_sample_next_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 3]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # top_k=1 and a tiny top_p both leave only the argmax
        assert sample_next(logits, 1.0, top_k=1, generator=g).tolist() == [1, 3]
        assert sample_next(logits, 1.0, top_p=1e-3, generator=g).tolist() == [1, 3]
    # top_k=2 on row 0: only ids 1 and 2 ever come out
    seen = {sample_next(logits, 5.0, top_k=2, generator=g)[0].item() for _ in range(200)}
    assert seen == {1, 2}
    # top_p: p = softmax([1, 3, 2, 0]) = [.087, .644, .237, .032]; 0.8 keeps {1, 2}, 0.9 adds 0
    seen = {sample_next(logits[:1], 1.0, top_p=0.8, generator=g).item() for _ in range(300)}
    assert seen == {1, 2}
    seen = {sample_next(logits[:1], 1.0, top_p=0.9, generator=g).item() for _ in range(300)}
    assert seen == {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=-3), "max_new_tokens must be an integer >= 0"),
    ],
)
def test_bad_sampling_arguments(model, kwargs, message):
    args = dict(max_new_tokens=5, temperature=1.0)
    args.update(kwargs)
    with pytest.raises(GPTForgeError, match=message):
        generate(model, [1, 2], **args)


def test_prompt_outside_vocabulary(model):
    with pytest.raises(GPTForgeError, match=r"prompt token ids \[50300\] are outside the vocabulary"):
        generate(model, [1, 50300], 3)


# --- generation -------------------------------------------------------------------------------


def test_stops_at_eot_unless_told_not_to():
    m = eot_model()
    assert generate(m, [464, 318], 10, temperature=0) == [EOT_ID]
    assert generate(m, [464, 318], 10, temperature=0, stop_at_eot=False) == [EOT_ID] * 10
    assert generate_batch(m, [464], 10, num_samples=3, temperature=0) == [[EOT_ID]] * 3


def test_empty_prompt_and_zero_tokens(model):
    assert generate(model, [], 0) == []
    out = generate(model, [], 5, temperature=0, stop_at_eot=False)  # starts from <|endoftext|>
    assert out == generate(model, [EOT_ID], 5, temperature=0, stop_at_eot=False)


def test_batch_rows_and_seed(model):
    rows = generate_batch(model, [464, 3290], 12, num_samples=3, temperature=1.0, seed=7, stop_at_eot=False)
    again = generate_batch(model, [464, 3290], 12, num_samples=3, temperature=1.0, seed=7, stop_at_eot=False)
    assert rows == again and len(rows) == 3 and all(len(r) == 12 for r in rows)
    assert len({tuple(r) for r in rows}) > 1  # rows are drawn independently
    greedy = generate_batch(model, [464, 3290], 12, num_samples=2, temperature=0, stop_at_eot=False)
    assert greedy[0] == greedy[1] == generate(model, [464, 3290], 12, temperature=0, stop_at_eot=False)


def test_stream_callback_and_mode_restored(model):
    model.train()
    seen = []
    out = list(stream(model, [464], 6, temperature=0, callback=seen.append, stop_at_eot=False))
    assert out == seen and len(out) == 6
    assert model.training  # generate runs in eval mode and puts the mode back
    it = stream(model, [464], 50, temperature=0)
    next(it)
    it.close()  # stopping early also puts it back
    assert model.training
    model.eval()


def test_bf16_autocast_runtime(model):
    runtime = Runtime(torch.device("cpu"), "bf16")
    out = generate(model, [464, 3290], 10, temperature=0, runtime=runtime, stop_at_eot=False)
    assert len(out) == 10 and max(out) < 50257  # the cache holds bf16 keys/values under autocast


# --- streaming text ---------------------------------------------------------------------------


def test_text_decoder_holds_back_split_characters():
    tok = Tokenizer()
    text = "naïve 🦙 日本語 — ok"
    ids = tok.encode(text)
    split = [i for i in ids if not _is_whole_utf8(tok.decode_bytes([i]))]
    assert split, "the test text should contain a character split across tokens"
    decoder = TextDecoder(tok)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_decoder_flushes_an_unfinished_character():
    tok = Tokenizer()
    ids = tok.encode("🦙")
    decoder = TextDecoder(tok)
    assert "".join(decoder.add(i) for i in ids[:-1]) == ""
    assert decoder.flush() == "\ufffd"


def _is_whole_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- gptforge sample --------------------------------------------------------------------------


def test_sample_command_greedy_equals_generate(tmp_path, model, capsys):
    save_model(model, tmp_path / "ck")
    prompt = "Hello, I'm a language model,"
    rc = cli.main(["sample", str(tmp_path / "ck"), "--prompt", prompt, "--max-new-tokens", "15",
                   "--temperature", "0", "--device", "cpu", "--precision", "fp32"])
    assert rc == 0
    tok = Tokenizer()
    ids = generate(model, tok.encode(prompt), 15, temperature=0)
    expected = prompt + tok.decode([i for i in ids if i != EOT_ID]) + "\n"
    assert capsys.readouterr().out == expected


def test_sample_command_seeded_samples_and_no_cache(tmp_path, model, capsys):
    save_model(model, tmp_path / "ck")
    args = ["sample", str(tmp_path / "ck"), "--prompt", "The", "--max-new-tokens", "8", "--seed", "3",
            "--num-samples", "2", "--top-k", "40", "--top-p", "0.95", "--device", "cpu", "--precision", "fp32"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args + ["--no-cache"]) == 0
    assert capsys.readouterr().out == first
    samples = first.split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("The") for s in samples) and samples[0] != samples[1]


def test_sample_command_picks_the_newest_checkpoint_of_a_run(tmp_path, model, capsys):
    run = tmp_path / "run"
    save_model(GPT(preset("nano")), run / "checkpoints" / "step_000100")
    save_model(model, run / "checkpoints" / "step_000200")
    (run / "checkpoints" / "step_000200" / "state.pt").write_bytes(b"ignored")
    (run / "checkpoints" / "step_000300").mkdir()  # incomplete: no model files
    (run / "config.json").write_text('{"model": {"preset": "nano"}}')  # the run's own config
    assert cli.main(["sample", str(run), "--max-new-tokens", "3", "--device", "cpu", "--precision", "fp32"]) == 0
    assert "step_000200" in capsys.readouterr().err


def test_sample_command_errors(tmp_path, capsys):
    assert cli.main(["sample", str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert cli.main(["sample", str(tmp_path / "run")]) == 1
    assert "nor a run directory with a complete checkpoints" in capsys.readouterr().err
