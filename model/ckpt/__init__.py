"""Weights on disk: Hugging Face GPT-J directories, the native JAX-layout format, presets and
gs:// URIs, and which tokenizer goes with a checkpoint. Importable without JAX (the CPU ingress
uses it); JAX is imported only by the functions that put weights on devices."""
