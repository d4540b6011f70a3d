"""The network: GPT-J's config, layers, forward pass, KV cache, int8 and sharding, as pure functions
over explicit pytrees. Knows nothing of requests, slots or files."""
