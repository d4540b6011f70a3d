"""GPT-J 6B in JAX/Flax: config, layers, weights and KV cache, checkpoints, tokenizer, sharding,
and the inference engine. Nothing in this package imports Ray."""
