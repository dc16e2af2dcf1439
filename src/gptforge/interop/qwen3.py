"""Qwen3 (`Qwen3ForCausalLM`), or Llama (`LlamaForCausalLM`) without QK-norm: the adapter between
their files and the model with the modern recipe's components. Both compute what gptforge's model
computes with RMSNorm + RoPE (rotate-half, the same tables) + SwiGLU + no biases, so export and
import are renames, with our fused projections split or joined: c_attn = [q; k; v], c_fc = [gate; up].

A component neither has (the logit softcap, ReLU^2 or GELU MLPs, LayerNorm, learned positions,
biases) makes a config not exportable: `problems` names the keys to change. The functions are
those of every adapter (see gptforge.interop.gpt2).
"""

from __future__ import annotations

import torch

from gptforge.checkpoint import field_problems
from gptforge.errors import GPTForgeError
from gptforge.model import EXTRAS_OFF, GPT, RECIPES, GPTConfig

NAME = "Qwen3/Llama"
NORM_EPS = RECIPES["modern"]["norm_eps"]  # rms_norm_eps when config.json names none
MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
LM_HEAD = "lm_head.weight"


def problems(c: GPTConfig) -> list[str]:
    """The keys (with the values to change them to) that keep `c` from being a Qwen3 / Llama."""
    wrong = []
    if c.softcap != 0:
        wrong.append(f"model.softcap={c.softcap:g} (to 0)")
    if c.mlp != "swiglu":
        wrong.append(f"model.mlp={c.mlp} (to swiglu)")
    if c.norm != "rmsnorm":
        wrong.append(f"model.norm={c.norm} (to rmsnorm)")
    if not c.rope:
        wrong.append("model.rope=false (to true)")
    if c.bias:
        wrong.append("model.bias=true (to false)")
    return wrong + c.differences(dict(norm_gain=True, embed_norm=False, **EXTRAS_OFF))


def model_type(c: GPTConfig) -> str:
    return "qwen3" if c.qk_norm else "llama"


def hf_config(c: GPTConfig, dtype: torch.dtype = torch.float32, eot_id: int = 50256) -> dict:
    """config.json of a Qwen3ForCausalLM (LlamaForCausalLM without QK-norm) with this architecture."""
    kind = model_type(c)
    out = {
        "architectures": [MODEL_TYPES[kind]],
        "model_type": kind,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": c.dropout,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if kind == "qwen3":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    else:
        out.update(mlp_bias=False, pretraining_tp=1)
    return out


def weights_out(model: GPT, eot_id: int = 50256) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF state dict, HF config.json) of a model Qwen3 / Llama computes (problems(config) == [])."""
    state = hf_state_dict(model)
    return state, hf_config(model.config, state["model.embed_tokens.weight"].dtype, eot_id)


def _names(i: int) -> dict[str, str]:
    """Our per-block names -> HF's (the fused c_attn / c_fc are split apart elsewhere)."""
    return {
        f"transformer.h.{i}.ln_1.weight": f"model.layers.{i}.input_layernorm.weight",
        f"transformer.h.{i}.ln_2.weight": f"model.layers.{i}.post_attention_layernorm.weight",
        f"transformer.h.{i}.attn.c_proj.weight": f"model.layers.{i}.self_attn.o_proj.weight",
        f"transformer.h.{i}.attn.q_norm.weight": f"model.layers.{i}.self_attn.q_norm.weight",
        f"transformer.h.{i}.attn.k_norm.weight": f"model.layers.{i}.self_attn.k_norm.weight",
        f"transformer.h.{i}.mlp.c_proj.weight": f"model.layers.{i}.mlp.down_proj.weight",
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Qwen3's / Llama's names, the vocabulary unpadded, a tied head stored once."""
    c = model.config
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["transformer.wte.weight"][: c.vocab_size],
           "model.norm.weight": ours["transformer.ln_f.weight"]}
    if not c.tie_embeddings:
        out[LM_HEAD] = ours[LM_HEAD][: c.vocab_size]
    for i in range(c.n_layer):
        for name, hf_name in _names(i).items():
            if name in ours:
                out[hf_name] = ours[name]
        q, k, v = ours[f"transformer.h.{i}.attn.c_attn.weight"].split(c.n_embd, dim=0)  # 3 x (C, C)
        gate, up = ours[f"transformer.h.{i}.mlp.c_fc.weight"].chunk(2, dim=0)  # 2 x (F, C)
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out.update({f"{attn}.q_proj.weight": q, f"{attn}.k_proj.weight": k, f"{attn}.v_proj.weight": v,
                    f"{mlp}.gate_proj.weight": gate, f"{mlp}.up_proj.weight": up})
    return {k: v.contiguous() for k, v in out.items()}


def recognise(hf: dict) -> bool:
    return hf.get("model_type") in MODEL_TYPES


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """The GPTConfig (modern recipe) of a Qwen3 / Llama config.json; variants it lacks are refused."""
    kind = hf.get("model_type")
    problems = field_problems(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                   "intermediate_size", "max_position_embeddings"), ("rms_norm_eps", "rope_theta"))
    if not isinstance(hf.get("rope_parameters") or {}, dict):
        problems.append(f"rope_parameters is not an object ({hf.get('rope_parameters')!r:.40})")
    else:
        problems += [f"rope_parameters.{p}" for p in field_problems(hf.get("rope_parameters") or {}, (), ("rope_theta",))]
    if problems:
        raise GPTForgeError(f"{where}: not a readable {kind} config: " + "; ".join(problems))
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if hf.get("num_key_value_heads", H) != H:
        problems.append(f"num_key_value_heads {hf['num_key_value_heads']} != num_attention_heads {H} (grouped-query attention)")
    if hf.get("head_dim", C // H) != C // H or C % H:
        problems.append(f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU uses silu)")
    eps = hf.get("rms_norm_eps", NORM_EPS)
    if not isinstance(eps, (int, float)) or not eps > 0:
        problems.append(f"rms_norm_eps {eps!r} (expected a positive number)")
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        problems.append(f"rope scaling {rope.get('rope_type') or hf.get('rope_scaling')!r} (plain RoPE only)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("biases (attention_bias / mlp_bias)")
    if hf.get("use_sliding_window"):
        problems.append("sliding-window attention")
    if problems:
        raise GPTForgeError(f"{where}: not a {kind} the modern model computes: " + "; ".join(problems))
    config = GPTConfig(**{**RECIPES["modern"], **dict(
        block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=H, n_embd=C, rope_base=theta, norm_eps=float(eps), qk_norm=kind == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))}).validate()
    if config.mlp_hidden != hf["intermediate_size"]:
        raise GPTForgeError(f"{where}: intermediate_size {hf['intermediate_size']}, but gptforge's SwiGLU at "
                            f"hidden_size {C} has {config.mlp_hidden} (8/3 * C rounded to 64)")
    return config


def weights_in(state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """Qwen3 / Llama tensors -> ours (q, k, v and gate, up joined); every name and shape is
    checked afterwards against the model (checkpoint.check_state_matches, in interop.load)."""
    state = {k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise GPTForgeError(f"{where}: missing tensor model.{name}")
        used.add(name)
        return state[name]

    out["transformer.wte.weight"] = take("embed_tokens.weight")
    out["transformer.ln_f.weight"] = take("norm.weight")
    if not config.tie_embeddings:
        out[LM_HEAD] = take(LM_HEAD)
    elif LM_HEAD in state:  # transformers may store a tied head too: it must be the embedding
        used.add(LM_HEAD)
        if not torch.equal(state[LM_HEAD], out["transformer.wte.weight"]):
            raise GPTForgeError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
    for i in range(config.n_layer):
        for name, hf_name in _names(i).items():
            if "_norm." in name and not config.qk_norm:
                continue
            out[name] = take(hf_name.removeprefix("model."))
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
            [take(f"{attn}.{p}_proj.weight") for p in "qkv"], dim=0)  # (3C, C)
        out[f"transformer.h.{i}.mlp.c_fc.weight"] = torch.cat(
            [take(f"{mlp}.gate_proj.weight"), take(f"{mlp}.up_proj.weight")], dim=0)  # (2F, C)
    unexpected = sorted(k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise GPTForgeError(f"{where}: tensors the modern model does not have: {unexpected[:5]}")
    return out
