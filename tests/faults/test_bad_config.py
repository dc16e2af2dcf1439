"""Every bad config value is one line naming the key (or the file); SIGTERM stops a run like the
first Ctrl-C; a resumed run never logs a step twice. (Issue 26, items 11 and 12.)"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
import typing

import pytest

from gptforge import config as C
from gptforge.errors import GPTForgeError
from gptforge.training import checkpoint as ckpt
from gptforge.training.trainer import train

from .conftest import NANO, assert_one_line_error, cli_env, flags, metrics_rows, run_cli


def keys_of_type(tp) -> list[str]:
    """Every dotted key whose field is of type `tp` (or `tp | None`)."""
    out = []
    cfg = C.TrainConfig()
    for section in dataclasses.fields(cfg):
        for key, hint in typing.get_type_hints(type(getattr(cfg, section.name))).items():
            if hint is tp or (typing.get_origin(hint) is not None and tp in typing.get_args(hint)):
                out.append(f"{section.name}.{key}")
    return out


FLOAT_KEYS = keys_of_type(float)
INT_KEYS = keys_of_type(int)


def test_the_keys_are_found():
    assert {"optim.grad_clip", "run.max_minutes", "optim.weight_decay", "optim.eps", "model.softcap"} <= set(FLOAT_KEYS)
    assert {"run.seed", "run.max_steps", "model.n_layer"} <= set(INT_KEYS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e400"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_in_one_line(key, value):
    with pytest.raises(GPTForgeError) as e:
        C.resolve(None, [(key, value)])
    assert key in str(e.value) and "finite" in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_from_a_toml_file_or_set_in_python_is_refused(tmp_path, key):
    section, name = key.split(".")
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{name} = nan\n")
    with pytest.raises(GPTForgeError, match=rf"{key}.*finite"):
        C.resolve(path)
    cfg = C.TrainConfig()
    setattr(getattr(cfg, section), name, float("inf"))
    with pytest.raises(GPTForgeError, match=rf"{key} must be a finite number, got inf"):
        cfg.validate()


@pytest.mark.parametrize("value", [str(2**64), str(-(2**63) - 1), "1" + "0" * 30])
@pytest.mark.parametrize("key", INT_KEYS)
def test_every_int_key_refuses_values_beyond_64_bits_in_one_line(key, value):
    with pytest.raises(GPTForgeError) as e:
        C.resolve(None, [(key, value)])
    assert key in str(e.value) and "2**63" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_64_bit_seeds_still_work():
    assert C.resolve(None, [("run.seed", str(2**63 - 1))]).run.seed == 2**63 - 1
    cfg = C.TrainConfig()
    cfg.run.seed = 2**70
    with pytest.raises(GPTForgeError, match=r"run.seed must be an integer from -2\*\*63 to 2\*\*63-1"):
        cfg.validate()


def test_cli_nan_eps_and_huge_seed_are_one_line(tmp_path, shards_dir):
    """`--optim.eps nan` reached torch's AdamW (a traceback); a seed beyond 64 bits, torch.manual_seed."""
    run = tmp_path / "run"
    p = run_cli("train", *flags(run, shards_dir, **{"run.max_steps": 1, "optim.eps": "nan"}))
    assert_one_line_error(p, "train", "optim.eps", "finite")
    p = run_cli("train", *flags(run, shards_dir, **{"run.max_steps": 1, "run.seed": str(2**64)}))
    assert_one_line_error(p, "train", "run.seed", str(2**64))
    assert not (run / "checkpoints").exists()


def test_a_toml_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[run]\nname = "café"\n'.encode("latin-1"))
    with pytest.raises(GPTForgeError, match=rf"{bad}: not valid TOML \(byte 0xe9 at offset \d+ is not UTF-8\)"):
        C.load_toml(bad)
    p = run_cli("train", "--config", str(bad))
    assert_one_line_error(p, "train", str(bad), "not UTF-8")


# ------------------------------------------------------------------------------ SIGTERM, resume


def wait_for_step(run, proc, step: int, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(r.get("step", -1) >= step for r in metrics_rows(run) if "loss" in r):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} logged (exit {proc.poll()})")


def train_rows(run) -> list[int]:
    return [r["step"] for r in metrics_rows(run) if "loss" in r]


def test_sigterm_finishes_the_step_checkpoints_and_exits_143_then_resume_logs_each_step_once(tmp_path, shards_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptforge", "train", *flags(run, shards_dir, **{"run.max_steps": 100000, "run.ckpt_every": 0})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        wait_for_step(run, proc, 2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped (terminated) after step" in out, out[-2000:] + err[-2000:]
    saved = [s for s, _ in ckpt.list_checkpoints(run)]
    steps = train_rows(run)
    assert saved == [len(steps)] and steps == list(range(len(steps)))  # the last step finished, then saved
    p = run_cli("train", "--resume", "auto", "--run.dir", str(run), "--run.max_steps", str(saved[0] + 2))
    assert p.returncode == 0, p.stderr[-3000:]
    assert train_rows(run) == list(range(saved[0] + 2))


def test_resume_from_an_earlier_checkpoint_logs_each_step_once(tmp_path, shards_dir):
    """What a kill after a checkpoint leaves: rows past it (and a line torn by the kill). Resuming
    there replays those steps; their old rows go, so no step is logged twice."""
    run = tmp_path / "run"
    over = dict(NANO, **{"data.dir": str(shards_dir), "run.dir": str(run), "run.max_steps": "4",
                         "run.ckpt_every": "2", "run.eval_every": "2", "run.sample_tokens": "0"})
    cfg = C.resolve(None, list(over.items()))
    first = train(cfg, progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn
    res = train(cfg, resume=str(ckpt.checkpoints_dir(run) / ckpt.step_dir_name(2)), progress=False)
    rows = metrics_rows(run)
    assert train_rows(run) == [0, 1, 2, 3]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert res.losses == {s: first.losses[s] for s in (2, 3)}  # bitwise: the same steps again
