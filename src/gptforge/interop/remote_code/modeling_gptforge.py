"""A gptforge model for transformers' `AutoModelForCausalLM` with `trust_remote_code=True`.

The computation is gptforge's own model.py (with errors.py and loss.py, its relative imports),
copied beside this file: no second implementation. This file only wraps it: HF's names in and out
(input_ids, labels, CausalLMOutputWithPast) and GenerationMixin. Generation recomputes the whole
prefix each step (no KV cache): the same logits as gptforge's cached sampling, slower on long
outputs. Padding (an attention_mask with zeros) is refused: the model attends causally to every
position it is given."""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_gptforge import GPTForgeConfig
from .model import GPT, GPTConfig, Rotary


class GPTForgeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GPTForgeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: GPTForgeConfig):
        super().__init__(config)
        self.model = GPT(GPTConfig.from_dict(config.gptforge))
        if self.model.tied:  # one Parameter in gptforge; transformers re-ties it after loading
            self._tied_weights_keys = {"model.lm_head.weight": "model.transformer.wte.weight"}
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """Only what a checkpoint does not hold: the non-persistent buffers (rotary tables, the
        manual attention's causal mask), recomputed. Every weight comes from model.safetensors."""
        if isinstance(module, Rotary):
            cos, sin = module.tables(module.cos.device)
            module.cos.copy_(cos)
            module.sin.copy_(sin)
        elif getattr(module, "flash", True) is False and hasattr(module, "bias"):
            n = module.bias.size(-1)
            module.bias.copy_(torch.tril(torch.ones(n, n, dtype=torch.bool, device=module.bias.device)).view(1, 1, n, n))

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("gptforge's exported model takes no padding: pass unpadded rows (an attention_mask of ones)")
        logits, _ = self.model(input_ids)  # (B, T, vocab_size), soft-capped when the model caps
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 = not scored
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
