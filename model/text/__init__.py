"""Text: GPT-J's tokenizer (GPT-2 byte-level BPE) and incremental detokenisation. No JAX."""
