"""The configuration of a gptforge model exported for `trust_remote_code`: GPTConfig's fields,
all of them, under the key `gptforge` (written by gptforge.interop.remote; read back by
gptforge's import-hf), and the few keys transformers itself reads."""

from transformers import PretrainedConfig


class GPTForgeConfig(PretrainedConfig):
    model_type = "gptforge"

    def __init__(self, gptforge: dict | None = None, **kwargs):
        self.gptforge = dict(gptforge or {})
        g = self.gptforge
        # what transformers' generation and pipelines read, derived from the fields (never set apart)
        kwargs.setdefault("tie_word_embeddings", g.get("tie_embeddings", True))
        kwargs.setdefault("use_cache", False)  # the model recomputes the whole prefix each step
        self.vocab_size = g.get("vocab_size")
        self.hidden_size = g.get("n_embd")
        self.num_hidden_layers = g.get("n_layer")
        self.num_attention_heads = g.get("n_head")
        self.max_position_embeddings = g.get("block_size")
        super().__init__(**kwargs)
