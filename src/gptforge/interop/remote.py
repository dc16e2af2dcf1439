"""Our own modeling file (`trust_remote_code`): the adapter for every model no built-in
transformers architecture computes (a softcap, ReLU^2, learned positions with the modern parts,
any switch). The export is a transformers directory whose modeling code IS gptforge's model.py
(copied with the sibling files it imports relatively) beside a small configuration_gptforge.py
and modeling_gptforge.py (gptforge.interop.remote_code): `AutoModelForCausalLM.from_pretrained(
DIR, trust_remote_code=True)` loads it with no gptforge installed. config.json holds every
GPTConfig field under `gptforge`, so any switch exports without being named here, and
gptforge reads the directory back (model_type "gptforge").

The functions are those of every adapter (see gptforge.interop.gpt2), plus `code_files`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from gptforge.errors import GPTForgeError
from gptforge.model import GPT, GPTConfig

NAME = "gptforge (trust_remote_code)"
MODEL_TYPE = "gptforge"
ARCHITECTURE = "GPTForgeForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_gptforge.GPTForgeConfig",
            "AutoModelForCausalLM": "modeling_gptforge.GPTForgeForCausalLM"}
PREFIX = "model."  # GPTForgeForCausalLM holds the GPT as `.model`
LM_HEAD = "lm_head.weight"
PACKAGE = Path(__file__).resolve().parent.parent  # src/gptforge: model.py and its siblings
WRAPPERS = Path(__file__).resolve().parent / "remote_code"


def recognise(hf: dict) -> bool:
    return hf.get("model_type") == MODEL_TYPE


def problems(c: GPTConfig) -> list[str]:
    """Nothing: the modeling file is the model itself."""
    return []


def hf_config(c: GPTConfig, dtype: torch.dtype = torch.float32, eot_id: int = 50256) -> dict:
    """config.json: GPTConfig's fields under `gptforge`, the auto_map to the modeling files, and
    the keys transformers reads (derived from the fields again when the config is built)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "gptforge": c.to_dict(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "max_position_embeddings": c.block_size,
        "tie_word_embeddings": c.tie_embeddings,
        "use_cache": False,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def weights_out(model: GPT, eot_id: int = 50256) -> tuple[dict[str, torch.Tensor], dict]:
    """(our state dict under `model.`, a tied head stored once; config.json)."""
    ours = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.tied:
        ours.pop(LM_HEAD)
    state = {PREFIX + k: v for k, v in ours.items()}
    return state, hf_config(model.config, ours["transformer.wte.weight"].dtype, eot_id)


def code_files() -> dict[str, bytes]:
    """The modeling files of the directory: the two wrappers, model.py, and every sibling module
    model.py reaches by `from .x import` (followed through those files too)."""
    out = {p.name: p.read_bytes() for p in sorted(WRAPPERS.glob("*.py"))}
    todo = ["model"]
    while todo:
        name = todo.pop()
        if f"{name}.py" in out:
            continue
        path = PACKAGE / f"{name}.py"
        if not path.is_file():
            raise GPTForgeError(f"{PACKAGE / 'model.py'}: relative import .{name} is no sibling file; the modeling "
                                "code must import only torch and files beside it")
        out[path.name] = path.read_bytes()
        for node in ast.walk(ast.parse(out[path.name], str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(node.module)
    return out


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """GPTConfig from the `gptforge` fields of the config.json an export wrote."""
    fields = hf.get("gptforge")
    if not isinstance(fields, dict):
        raise GPTForgeError(f"{where}: model_type 'gptforge' needs the object 'gptforge' (GPTConfig's fields), "
                            f"got {type(fields).__name__}")
    try:
        return GPTConfig.from_dict(fields)
    except GPTForgeError as e:
        raise GPTForgeError(f"{where}: field 'gptforge': {e}") from e
    except TypeError as e:  # a field of the wrong kind that the dataclass itself rejects
        raise GPTForgeError(f"{where}: field 'gptforge': {e}") from e


def weights_in(state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """The export's tensors -> ours (the `model.` prefix removed); names and shapes are checked
    against the model afterwards (checkpoint.check_state_matches, in interop.load)."""
    stray = sorted(k for k in state if not k.startswith(PREFIX))
    if stray:
        raise GPTForgeError(f"{where}: tensors outside the model ({PREFIX}*): {stray[:5]}")
    out = {k.removeprefix(PREFIX): v for k, v in state.items()}
    if config.tie_embeddings and LM_HEAD in out:  # a re-save may store the tied head too: it must be the embedding
        head = out.pop(LM_HEAD)
        if not torch.equal(head, out.get("transformer.wte.weight", head)):
            raise GPTForgeError(f"{where}: tie_embeddings is true but {PREFIX}{LM_HEAD} differs from the token embedding")
    return out
