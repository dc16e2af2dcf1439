"""gptforge: pretrain GPT-2-class language models from scratch."""

__version__ = "0.1.0"
