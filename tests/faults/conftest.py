"""Helpers of the fault-injection suite: the CLI in a subprocess, tree digests, one-line errors.

The shards_dir / corpus_dir fixtures of tests/conftest.py are visible here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# nano GPT, 32-token sequences, 2 micro-steps of 4 sequences per step, fp32 on the CPU
NANO = {
    "model.preset": "nano", "model.arch": "gpt2", "data.seq_len": "32", "data.prefetch": "0",
    "optim.batch_tokens": "256", "optim.micro_batch_size": "4", "optim.lr": "3e-3", "optim.warmup_steps": "2",
    "run.device": "cpu", "run.precision": "fp32", "run.eval_every": "0", "run.eval_tokens": "512",
    "run.sample_tokens": "4", "run.peak_tflops": "1.0",
}


def flags(run_dir: Path | None = None, data_dir: Path | None = None, **overrides) -> list[str]:
    """`--section.key value` flags of a nano run (overrides use `section__key` or dotted dict keys)."""
    d = dict(NANO)
    if run_dir is not None:
        d["run.dir"] = str(run_dir)
    if data_dir is not None:
        d["data.dir"] = str(data_dir)
    d.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    out = []
    for k, v in d.items():
        out += [f"--{k}", v]
    return out


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("CI", None)
    return env


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=cli_env())


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and "dir" for every directory) under root."""
    root = Path(root)
    out = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *mentions: str) -> str:
    """A clean user error: exit 1, no traceback, one line `gptforge CMD: error: ...` naming `mentions`."""
    err = proc.stderr.strip()
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"gptforge {command}: error: "), lines[0]
    for m in mentions:
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    print(lines[0])  # with -s: the messages users would see
    return lines[0]


def metrics_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by kill -9 in the middle of a write
            pass
    return rows


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """step -> train loss, the last occurrence of each step winning (a resumed run redoes steps)."""
    out = {}
    for r in metrics_rows(run_dir):
        if "loss" in r and "event" not in r:
            out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="session")
def fault_seed() -> int:
    """GPTFORGE_FAULT_SEED=N reproduces a run's random kill points; by default a fresh seed, printed."""
    seed = int(os.environ.get("GPTFORGE_FAULT_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"\nfault-injection seed: {seed} (set GPTFORGE_FAULT_SEED={seed} to replay)")
    return seed


class Result:
    """What an in-process `gptforge` call returned."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def gf(capsys):
    """gptforge.cli.main in-process: returns an object with returncode / stdout / stderr."""
    from gptforge import cli

    def call(*args: str) -> Result:
        capsys.readouterr()
        rc = cli.main(list(args))
        out, err = capsys.readouterr()
        return Result(rc, out, err)

    return call
