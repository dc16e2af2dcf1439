"""Interop with outside formats: one adapter module per Hugging Face architecture (gpt2: GPT-2;
qwen3: Qwen3 and Llama; nanochat: NanoChat; remote: our own modeling file, for every model no
built-in class computes), each with the same functions (recognise, config_from_hf, weights_in,
problems, weights_out); `load` resolves whatever a user points at; `export` writes a directory
transformers reads."""
