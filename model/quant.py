"""The one matmul entry point for weights.

Every contraction against a weight goes through `einsum`, so a weight leaf can change its data type
(for example to a quantized array) without touching the model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def einsum(spec: str, x: jax.Array, w) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in x's dtype; `w`'s contracted dims come first, output dims last."""
    return jnp.einsum(spec, x, w.astype(x.dtype))
