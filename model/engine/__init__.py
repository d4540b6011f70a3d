"""The device side of serving, behind JetStream's engine API (`model.engine.api`): prefill, insert,
generate over static shapes. `dense` is the slot-contiguous KV cache engine, `mock` a
hand-computable engine for testing the host side without a model."""
