"""Deprecated: Hugging Face interop lives in gptforge.interop (load, export, one adapter per format)."""

from gptforge.interop.export import EOT_ID, EOT_TEXT, export_hf, write_tokenizer_files
from gptforge.interop.gpt2 import CONV1D, HUB_MODELS, config_from_hf, hf_config, hf_state_dict
from gptforge.interop.load import (
    LOAD_OVERRIDES,
    WEIGHT_FILES,
    load_pretrained,
    locate,
    read_hf_weights,
    resolve_source,
    source_config,
    tokenizer_of,
)

__all__ = ["CONV1D", "EOT_ID", "EOT_TEXT", "HUB_MODELS", "LOAD_OVERRIDES", "WEIGHT_FILES", "config_from_hf", "export_hf",
           "hf_config", "hf_state_dict", "load_pretrained", "locate", "read_hf_weights", "resolve_source",
           "source_config", "tokenizer_of", "write_tokenizer_files"]
