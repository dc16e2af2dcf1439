"""Run configuration: typed dataclasses, filled from defaults, then a TOML file, then the command line.

Sections: `model` (which architecture: a preset plus overrides; config.model), `data`, `optim`,
`run` (config.schema). Loading (TOML, packaged names, CLI overrides) is config.loading; the checks
of every field together, config.validation; each field's help (`arg(default, help)`, kept in the
field's metadata) is the CLI help of `gptforge train --help`, config.fields. Unknown keys and
wrong types are errors that list the valid keys.

Batch arithmetic and the optimizer/schedule policy live with training (gptforge.training.plan).
"""

from __future__ import annotations

from gptforge.config.fields import arg, field_help
from gptforge.config.loading import load_toml, packaged_config, packaged_configs, parse_overrides, resolve
from gptforge.config.model import MODERN_KEYS, ModelArgs
from gptforge.config.schema import (AUTO_ZERO, RESOLVED, SECTIONS, DataArgs, OptimArgs, RunArgs, TrainConfig,
                                    apply_dict, describe, set_value)
from gptforge.config.validation import MUON_ADJUST_LR, OPTIMIZERS, PRECISIONS, SCHEDULES, validate

__all__ = [
    "AUTO_ZERO", "MODERN_KEYS", "MUON_ADJUST_LR", "OPTIMIZERS", "PRECISIONS", "RESOLVED", "SCHEDULES", "SECTIONS",
    "DataArgs", "ModelArgs", "OptimArgs", "RunArgs", "TrainConfig", "apply_dict", "arg", "describe", "field_help",
    "load_toml", "packaged_config", "packaged_configs", "parse_overrides", "resolve", "set_value", "validate",
]
