"""gptforge: pretrain GPT-2-class language models from scratch.

The Python API (nothing heavy is imported until a name is used)::

    from gptforge import GPT, GPTConfig, Tokenizer, TrainConfig, train, generate, load, prepare

    prepare(["texts/"], "data/mine")                      # text -> token shards; returns the manifest
    cfg = TrainConfig()                                    # the defaults of `gptforge train`
    cfg.data.dir, cfg.run.max_steps = "data/mine", 100
    result = train(cfg)                                    # the whole job; a TrainResult
    model = load(cfg.run.dir)                              # a run dir, checkpoint dir or HF GPT-2 dir
    tok = Tokenizer()
    print(tok.decode(generate(model, tok.encode("def "), max_new_tokens=50, top_k=50, seed=0)))
"""

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "Tokenizer", "TrainConfig", "train", "generate", "load", "load_pretrained", "load_tokenizer", "prepare",
           "train_tokenizer", "__version__"]

# name -> (module, attribute). No submodule is named like a top-level function (the trainer lives
# in gptforge.training, sampling in gptforge.sampling): importing a submodule sets it as the
# package's attribute, which would shadow a function of the same name.
_LAZY = {
    "GPT": ("gptforge.model", "GPT"),
    "GPTConfig": ("gptforge.model", "GPTConfig"),
    "Tokenizer": ("gptforge.tokenizer", "Tokenizer"),
    "TrainConfig": ("gptforge.config", "TrainConfig"),
    "train": ("gptforge.training.trainer", "train"),
    "generate": ("gptforge.sampling", "generate"),
    "load_pretrained": ("gptforge.interop.load", "load_pretrained"),
    "load": ("gptforge.interop.load", "load"),
    "prepare": ("gptforge.data.prepare", "prepare"),
    "train_tokenizer": ("gptforge.data.tokenizer_sample", "train_tokenizer"),
}


def __getattr__(name: str):
    """PEP 562: import on first use (so `import gptforge` stays cheap)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def load_tokenizer(path="gpt2"):
    """The tokenizer of a model or data, named once where it was made: "gpt2", a tokenizer
    directory (gptforge tokenizer train), a prepared data directory, a checkpoint, a run directory
    (its newest checkpoint) or a Hugging Face directory gptforge exported."""
    from gptforge.interop.load import locate
    from gptforge.tokenizer import resolve

    return resolve(path, locate=locate)
