"""NanoChat (`NanoChatForCausalLM`, built into transformers 5): the adapter between its files and
the model with nanochat's base components: RoPE, QK-norm, ReLU^2 MLP (4C), no biases, every norm
a parameter-free RMSNorm, one right after the token embedding, and an optional logit softcap
(`final_logit_softcapping`). The modern recipe with those switches exports as this:
`model.norm_gain=false model.embed_norm=true model.mlp=relu2` (and any softcap).

What transformers' class computes is nanochat's model of late 2025, without the techniques it
added since (value embeddings, residual / x0 lambdas, smear, backout): `problems` names them.
Two differences are only of form. Its rotary embeddings turn by -theta (rotate_half is
[x2, -x1]) where ours turn by +theta; swapping the two halves of each head's query and key rows
makes them the same (R(-theta) = P R(theta) P with P the half swap, and P leaves q . k alone).
It normalizes q and k after the rotation, we before: a parameter-free RMSNorm commutes with a
rotation (it keeps the norm). The functions are those of every adapter (see gptforge.interop.gpt2).
"""

from __future__ import annotations

import torch

from gptforge.checkpoint import field_problems
from gptforge.errors import GPTForgeError
from gptforge.model import EXTRAS_OFF, GPT, RECIPES, GPTConfig

NAME = "NanoChat"
MODEL_TYPE = "nanochat"
ARCHITECTURE = "NanoChatForCausalLM"
LM_HEAD = "lm_head.weight"
# what NanoChatForCausalLM computes, as switch values (softcap, tie and the sizes are its config's)
COMPUTES = dict(rope=True, qk_norm=True, norm="rmsnorm", norm_gain=False, embed_norm=True, mlp="relu2", bias=False,
                **EXTRAS_OFF)


def problems(c: GPTConfig) -> list[str]:
    """The keys (with the values to change them to) that keep `c` from being a NanoChat."""
    return c.differences(COMPUTES)


def recognise(hf: dict) -> bool:
    return hf.get("model_type") == MODEL_TYPE


def hf_config(c: GPTConfig, dtype: torch.dtype = torch.float32, eot_id: int = 50256) -> dict:
    """config.json of a NanoChatForCausalLM with this architecture."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head,
        "hidden_act": "relu2",
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "final_logit_softcapping": c.softcap or None,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": c.dropout,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def swap_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(H*D, C) query or key rows -> each head's two halves of D swapped (its own inverse)."""
    rows, cols = w.shape
    return w.view(n_head, 2, rows // n_head // 2, cols).flip(1).reshape(rows, cols)


def weights_out(model: GPT, eot_id: int = 50256) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF state dict, HF config.json) of a model NanoChat computes (problems(config) == [])."""
    c = model.config
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["transformer.wte.weight"][: c.vocab_size]}
    if not c.tie_embeddings:
        out[LM_HEAD] = ours[LM_HEAD][: c.vocab_size]
    for i in range(c.n_layer):
        q, k, v = ours[f"transformer.h.{i}.attn.c_attn.weight"].split(c.n_embd, dim=0)  # 3 x (C, C)
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out.update({f"{attn}.q_proj.weight": swap_halves(q, c.n_head), f"{attn}.k_proj.weight": swap_halves(k, c.n_head),
                    f"{attn}.v_proj.weight": v, f"{attn}.o_proj.weight": ours[f"transformer.h.{i}.attn.c_proj.weight"],
                    f"{mlp}.fc1.weight": ours[f"transformer.h.{i}.mlp.c_fc.weight"],
                    f"{mlp}.fc2.weight": ours[f"transformer.h.{i}.mlp.c_proj.weight"]})
    state = {k: v.contiguous() for k, v in out.items()}
    return state, hf_config(c, state["model.embed_tokens.weight"].dtype, eot_id)


def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """The GPTConfig of a NanoChat config.json; variants the model lacks are refused."""
    problems = field_problems(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                                   "intermediate_size", "max_position_embeddings"), ("rms_norm_eps",))
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        problems.append(f"rope_parameters is not an object ({rope!r:.40})")
        rope = {}
    else:
        problems += [f"rope_parameters.{p}" for p in field_problems(rope, (), ("rope_theta",))]
    cap = hf.get("final_logit_softcapping")
    if cap is not None and (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0):
        problems.append(f"final_logit_softcapping {cap!r} (expected a positive number or null)")
    if problems:
        raise GPTForgeError(f"{where}: not a readable nanochat config: " + "; ".join(problems))
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    if (hf.get("num_key_value_heads") or H) != H:
        problems.append(f"num_key_value_heads {hf['num_key_value_heads']} != num_attention_heads {H} (grouped-query attention)")
    if C % H or hf.get("head_dim", C // H) != C // H:
        problems.append(f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads")
    if hf.get("hidden_act", "relu2") != "relu2":
        problems.append(f"hidden_act {hf['hidden_act']!r} (nanochat's MLP uses relu2)")
    if hf["intermediate_size"] != 4 * C:
        problems.append(f"intermediate_size {hf['intermediate_size']} (gptforge's ReLU^2 MLP is 4 * hidden_size)")
    eps = hf.get("rms_norm_eps", 1e-6)
    if not eps > 0:
        problems.append(f"rms_norm_eps {eps!r} (expected a positive number)")
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        problems.append(f"rope scaling {rope.get('rope_type') or hf.get('rope_scaling')!r} (plain RoPE only)")
    if hf.get("attention_bias"):
        problems.append("attention_bias")
    if problems:
        raise GPTForgeError(f"{where}: not a nanochat model gptforge computes: " + "; ".join(problems))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return GPTConfig(**{**RECIPES["modern"], **COMPUTES, **dict(
        block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
        n_head=H, n_embd=C, rope_base=theta, norm_eps=float(eps), softcap=float(cap or 0.0),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))}).validate()


def weights_in(state: dict[str, torch.Tensor], config: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """NanoChat tensors -> ours (q, k, v joined, the query and key halves swapped back); every name
    and shape is checked afterwards against the model (checkpoint.check_state_matches, in interop.load)."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise GPTForgeError(f"{where}: missing tensor model.{name}")
        used.add(name)
        return state[name]

    out = {"transformer.wte.weight": take("embed_tokens.weight")}
    if not config.tie_embeddings:
        out[LM_HEAD] = take(LM_HEAD)
    elif LM_HEAD in state:  # transformers may store a tied head too: it must be the embedding
        used.add(LM_HEAD)
        if not torch.equal(state[LM_HEAD], out["transformer.wte.weight"]):
            raise GPTForgeError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
    H = config.n_head
    for i in range(config.n_layer):
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        q, k = (swap_halves(take(f"{attn}.{p}_proj.weight"), H) for p in "qk")
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, k, take(f"{attn}.v_proj.weight")], dim=0)  # (3C, C)
        out[f"transformer.h.{i}.attn.c_proj.weight"] = take(f"{attn}.o_proj.weight")
        out[f"transformer.h.{i}.mlp.c_fc.weight"] = take(f"{mlp}.fc1.weight")
        out[f"transformer.h.{i}.mlp.c_proj.weight"] = take(f"{mlp}.fc2.weight")
    unexpected = sorted(k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise GPTForgeError(f"{where}: tensors gptforge's nanochat model does not have: {unexpected[:5]}")
    return out
