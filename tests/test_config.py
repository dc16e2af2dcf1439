"""Config: defaults -> TOML -> overrides; every shipped config validates; clear errors."""

import dataclasses
from pathlib import Path

import pytest

from gptforge import config as C
from gptforge.training import plan as P
from gptforge.errors import GPTForgeError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"default.toml", "gpt2-124m.toml", "gpt2-350m.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path):
    cfg = C.resolve(path)
    per_rank = P.per_rank_sequences(cfg.optim.batch_tokens, P.seq_len_of(cfg))  # micro-batch auto (0) takes a divisor
    plan = P.BatchPlan.make(cfg.optim.batch_tokens, cfg.optim.micro_batch_size or per_rank, P.seq_len_of(cfg))
    assert plan.grad_accum_steps >= 1


def test_defaults_are_default_toml():
    """`gptforge train` with no arguments runs exactly configs/default.toml."""
    default = C.resolve(Path(__file__).parent.parent / "configs" / "default.toml")
    assert default == C.TrainConfig()


def test_gpt2_124m_is_the_build_nanogpt_recipe():
    cfg = C.resolve(Path(__file__).parent.parent / "configs" / "gpt2-124m.toml")
    o = cfg.optim
    assert (o.batch_tokens, o.lr, o.warmup_steps, o.decay_steps, o.weight_decay) == (524288, 6e-4, 715, 19073, 0.1)
    assert (o.beta1, o.beta2, o.eps, o.grad_clip, o.min_lr_ratio) == (0.9, 0.95, 1e-8, 1.0, 0.1)
    assert cfg.model.gpt_config().padded_vocab_size == 50304
    assert (cfg.run.precision, cfg.run.compile, P.seq_len_of(cfg)) == ("bf16", True, 1024)


def test_packaged_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    """`--config gpt2-124m` (or gpt2-124m.toml) is the packaged recipe wherever gptforge runs; a
    path that exists wins over the packaged name; an unknown name is one error listing the names."""
    from gptforge.commands.train import build_config

    shipped = C.resolve(Path(__file__).parent.parent / "configs" / "gpt2-124m.toml")
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert C.resolve("gpt2-124m") == C.resolve("gpt2-124m.toml") == shipped
    assert set(C.packaged_configs()) >= {"default", "gpt2-124m", "gpt2-350m", "finetune-gpt2"}
    cfg, _ = build_config(["--config", "gpt2-124m", "--run.max_steps", "5"])
    assert cfg.optim.batch_tokens == 524288 and cfg.run.max_steps == 5
    (tmp_path / "gpt2-124m.toml").write_text("[optim]\nlr = 1e-3\n")  # a file of that name here: it wins
    assert C.resolve("gpt2-124m.toml").optim.lr == 1e-3
    assert C.resolve("gpt2-124m").optim.lr == 6e-4  # a bare name that is no file: the packaged one
    with pytest.raises(GPTForgeError, match=r"^--config gpt2-125m: no such file; expected a TOML path or a packaged "
                                            r"config: .*\bdefault\b.*\bgpt2-124m\b"):
        build_config(["--config", "gpt2-125m"])
    with pytest.raises(GPTForgeError, match=r"--config configs/default.toml: no such file \(a packaged config is named "
                                            r"so: --config default\)"):
        C.resolve("configs/default.toml")  # a path that is not there is not silently replaced


def test_order_defaults_then_toml_then_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlr = 3e-4\nwarmup_steps = 5\n[run]\nmax_steps = 50\n')
    cfg = C.resolve(toml, C.parse_overrides(["--optim.lr", "1e-4", "--run.seed=7", "--model.preset", "nano"]))
    assert cfg.optim.lr == 1e-4  # override beats file
    assert cfg.optim.warmup_steps == 5  # file beats default
    assert cfg.run.max_steps == 50 and cfg.run.seed == 7 and cfg.model.preset == "nano"
    assert cfg.optim.beta2 == 0.95  # default


def test_unknown_key_lists_valid_keys(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[optim]\nlearning_rate = 3e-4\n")
    with pytest.raises(GPTForgeError, match=r"c.toml.*unknown key 'optim.learning_rate'.*valid keys.*\blr\b"):
        C.resolve(toml)
    with pytest.raises(GPTForgeError, match="unknown section"):
        C.TrainConfig.from_dict({"optimizer": {}})
    with pytest.raises(GPTForgeError, match=r"--run.max_step.*valid keys.*max_steps"):
        C.resolve(None, [("run.max_step", "3")])


def test_wrong_types_are_named():
    with pytest.raises(GPTForgeError, match=r"run.max_steps expects int, got 'ten'"):
        C.resolve(None, [("run.max_steps", "ten")])
    with pytest.raises(GPTForgeError, match=r"optim.lr expects float"):
        C.TrainConfig.from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(GPTForgeError, match=r"run.compile expects bool"):
        C.TrainConfig.from_dict({"run": {"compile": 3}})


def test_bool_and_none_values_from_the_command_line():
    cfg = C.resolve(None, [("run.compile", "on"), ("model.pad_vocab", "true"), ("model.n_layer", "3")])
    assert cfg.run.compile is True and cfg.model.pad_vocab is True and cfg.model.gpt_config().n_layer == 3


def test_invalid_values_reported_together():
    with pytest.raises(GPTForgeError) as e:
        C.resolve(None, [("run.max_steps", "0"), ("optim.lr", "-1"), ("model.preset", "gpt5")])
    msg = str(e.value)
    assert "run.max_steps must be > 0" in msg and "optim.lr must be a positive" in msg and "unknown preset 'gpt5'" in msg


def test_batch_that_does_not_divide():
    with pytest.raises(GPTForgeError, match=r"optim.batch_tokens \(1000\) must be a multiple of .* = 4 \* 64 \* 2 = 512"):
        P.BatchPlan.make(1000, 4, 64, 2)
    assert P.BatchPlan.make(524288, 64, 1024, 8).grad_accum_steps == 1
    assert P.BatchPlan.make(524288, 16, 1024, 1).grad_accum_steps == 32


def test_seq_len_longer_than_block():
    with pytest.raises(GPTForgeError, match=r"data.seq_len \(512\) exceeds the model's block_size \(256\)"):
        C.resolve(None, [("data.seq_len", "512")])


def test_overrides_syntax_errors():
    with pytest.raises(GPTForgeError, match="needs a value"):
        C.parse_overrides(["--run.max_steps"])
    with pytest.raises(GPTForgeError, match="unexpected argument 'stray'"):
        C.parse_overrides(["stray"])


def test_help_lists_every_key_with_its_doc():
    text = C.describe()
    assert "--optim.batch_tokens (int, default 4096): tokens per optimizer step" in text
    assert "--run.resume" not in text and "--model.preset" in text


def test_every_field_has_help_from_its_metadata_and_train_help_shows_it():
    """The CLI help comes from the dataclass fields themselves (no source scraping)."""
    for name in C.SECTIONS:
        section = type(getattr(C.TrainConfig(), name))
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
    text = C.describe()
    assert "--optim.beta2 (float, default 0.95): AdamW beta2" in text
