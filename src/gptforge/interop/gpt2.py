"""GPT-2 (`GPT2LMHeadModel`): the adapter between transformers' GPT-2 files and the model.

Our parameter names are HF's GPT-2 names (`transformer.h.N.attn.c_attn.weight`, ...), so both
directions are one loop with two differences: HF's Conv1D stores Linear weights as (in, out), so
c_attn, c_proj and c_fc weights are transposed; and HF checkpoints carry non-parameter buffers
(`attn.bias`, `attn.masked_bias`) that are skipped. Every tensor's shape is checked.

Every adapter of gptforge.interop has the same functions: recognise(hf_config) -> bool,
config_from_hf, weights_in (HF state -> ours), problems(config) (what keeps a config from being
this format; [] = exportable) and weights_out (our model -> HF state + HF config.json).
"""

from __future__ import annotations

import re

import torch

from gptforge.checkpoint import field_problems
from gptforge.errors import GPTForgeError
from gptforge.model import EXTRAS_OFF, GPT, GPTConfig

NAME = "GPT-2"
HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's, under openai-community/
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights
LM_HEAD = "lm_head.weight"
EOT_ID = 50256
# what GPT-2 computes, as switch values (bias: a missing bias is written as a zero bias)
COMPUTES = dict(rope=False, norm="layernorm", mlp="gelu", tie_embeddings=True, qk_norm=False, softcap=0.0,
                norm_gain=True, embed_norm=False, **EXTRAS_OFF)


def recognise(hf: dict) -> bool:
    return hf.get("model_type", "gpt2") == "gpt2"


def problems(c: GPTConfig) -> list[str]:
    """The keys (with the values to change them to) that keep `c` from being a GPT-2."""
    return [f"model.{k}={_show(getattr(c, k))} (to {_show(v)})" for k, v in COMPUTES.items() if getattr(c, k) != v]


def _show(v) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """The GPTConfig of an HF GPT-2 config.json; variants GPT-2 does not have are refused."""
    n_positions = hf.get("n_positions", hf.get("n_ctx"))
    problems = field_problems({**hf, "n_positions": n_positions}, ("n_embd", "n_layer", "n_head", "vocab_size",
                              "n_positions"), ("layer_norm_epsilon",))
    if problems:
        raise GPTForgeError(f"{where}: not a readable GPT-2 config: " + "; ".join(problems))
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf['activation_function']!r} (GPT-2 uses gelu_new)")
    if hf.get("n_inner") not in (None, 4 * (hf.get("n_embd") or 0)):
        problems.append(f"n_inner {hf['n_inner']} (GPT-2's MLP is 4 * n_embd)")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or not eps > 0:
        problems.append(f"layer_norm_epsilon {eps!r} (expected a positive number)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        problems.append("non-standard attention scaling (scale_attn_by_inverse_layer_idx / scale_attn_weights)")
    if hf.get("add_cross_attention"):
        problems.append("cross-attention layers (add_cross_attention)")
    if problems:
        raise GPTForgeError(f"{where}: not a plain GPT-2: " + "; ".join(problems))
    return GPTConfig(
        block_size=n_positions,
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        dropout=0.0,  # inference by default; pass dropout= to fine-tune
        norm_eps=float(eps),
    )


def weights_in(state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """Rename HF tensors to ours, transpose Conv1D weights, check every shape against `config`."""
    expected = {k: tuple(v.shape) for k, v in _shapes_model(config).items() if k != LM_HEAD}
    native: dict[str, torch.Tensor] = {}
    unexpected = []
    lm_head = None
    for hf_name, tensor in state.items():
        if BUFFERS.search(hf_name):
            continue
        if hf_name == "lm_head.weight":
            lm_head = tensor
            continue
        name = hf_name if hf_name.startswith("transformer.") else "transformer." + hf_name
        if name not in expected:
            unexpected.append(hf_name)
            continue
        conv1d = name.endswith(CONV1D)
        want = expected[name][::-1] if conv1d else expected[name]  # the shape as HF stores it
        if tuple(tensor.shape) != want:
            raise GPTForgeError(f"{where}: tensor {hf_name} has shape {tuple(tensor.shape)}, expected {want} for {_describe(config)}")
        native[name] = tensor.t().contiguous() if conv1d else tensor
    missing = sorted(set(expected) - set(native))
    if missing or unexpected:
        raise GPTForgeError(
            f"{where}: tensors do not match a GPT-2 of {_describe(config)}: missing {missing[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    wte = native["transformer.wte.weight"]
    if lm_head is not None and (lm_head.shape != wte.shape or not torch.equal(lm_head, wte)):
        raise GPTForgeError(f"{where}: lm_head.weight differs from transformer.wte.weight; gptforge's GPT-2 ties them")
    return native


def _describe(c: GPTConfig) -> str:
    return f"n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, vocab_size={c.vocab_size}, block_size={c.block_size}"


def _shapes_model(config: GPTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return GPT(config).state_dict()


def weights_out(model: GPT, eot_id: int = EOT_ID) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF state dict, HF config.json) of a model GPT-2 computes (problems(config) == [])."""
    state = hf_state_dict(model)
    return state, hf_config(model.config, state["transformer.wte.weight"].dtype, eot_id)


def hf_config(config: GPTConfig, dtype: torch.dtype = torch.float32, eot_id: int = EOT_ID) -> dict:
    """config.json of a transformers GPT2LMHeadModel with this architecture (<|endoftext|> = eot_id)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF's layout: Conv1D weights transposed, the vocabulary unpadded, the tied
    head stored once (as transformers itself saves it), zero biases where the model has none."""
    c = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != LM_HEAD}
    state["transformer.wte.weight"] = state["transformer.wte.weight"][: c.vocab_size]
    if not c.bias:  # a missing bias is a zero bias: GPT-2 always has them
        for name, tensor in list(state.items()):
            if name.endswith(CONV1D) or ".ln_" in name:  # LayerNorm and Linear weights
                bias = name[: -len("weight")] + "bias"
                state.setdefault(bias, tensor.new_zeros(tensor.size(0)))
    return {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state.items()}
