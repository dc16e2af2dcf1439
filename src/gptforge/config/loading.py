"""Loading: defaults -> a TOML file (a path, or a packaged recipe by name) -> command-line
overrides, then validation."""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gptforge.config.schema import TrainConfig, apply_dict, set_value
from gptforge.errors import GPTForgeError


def packaged_configs() -> dict[str, Path]:
    """name -> path of the TOML recipes shipped in the package (gptforge/configs/*.toml)."""
    root = importlib.resources.files("gptforge") / "configs"
    return {f.name[: -len(".toml")]: Path(str(f)) for f in root.iterdir() if f.name.endswith(".toml")}


def packaged_config(spec: str | Path) -> Path:
    """The config file `--config` names: a path that exists wins; else a packaged config by name
    (`gpt2-124m` or `gpt2-124m.toml`), from any directory; else one error listing those names."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    packaged = packaged_configs()
    name = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
    if name in packaged and str(spec) in (name, f"{name}.toml"):
        return packaged[name]
    hint = f" (a packaged config is named so: --config {name})" if name in packaged else ""
    raise GPTForgeError(f"--config {spec}: no such file{hint}; expected a TOML path or a packaged config: "
                        f"{', '.join(sorted(packaged))}")


def load_toml(path: str | Path) -> dict:
    """The tables of a config file: a path, or a packaged config's name (see packaged_config)."""
    path = packaged_config(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: config file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise GPTForgeError(f"{path}: not valid TOML ({e})") from e
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise GPTForgeError(f"{path}: not valid TOML (byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8)") from e
    except OSError as e:
        raise GPTForgeError(f"{path}: cannot read the config file ({e.strerror or e})") from e


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """['--run.max_steps', '10', '--optim.lr=3e-4'] -> [('run.max_steps', '10'), ('optim.lr', '3e-4')]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise GPTForgeError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise GPTForgeError(f"{arg} needs a value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        out.append((key, value))
    return out


def resolve(config_file: str | Path | None = None, overrides: list[tuple[str, str]] | None = None) -> TrainConfig:
    """Defaults -> TOML file -> overrides, then validate."""
    cfg = TrainConfig()
    if config_file:
        apply_dict(cfg, load_toml(config_file), str(config_file))
    for key, value in overrides or []:
        set_value(cfg, key, value, f"--{key}")
    try:
        return cfg.validate()
    except GPTForgeError as e:
        if config_file:  # name where the values came from
            raise GPTForgeError(f"{config_file} (with command-line overrides): {e}") from None
        raise
