"""int8 quantization as a data type, and the one matmul entry point for weights.

`QuantArray(values, scale)` is a pytree leaf pair: int8 `values` and float32 `scale`, symmetric,
one scale per output channel (per token and head for the KV cache). A weight leaf is either a plain
array or a QuantArray; every contraction against a weight goes through `einsum`, so the model
code is the same for both (no module swap).

Formulation (why the scale multiplies the output): for w[k, o] = values[k, o] * scale[o],
    x @ w = (x @ values) * scale
so the int8 values go straight into the dot (converted to the activation dtype in the dot's
operand fusion) and the per-channel scale is applied once to the small output, never to the
whole weight. On TPU this lets XLA use the MXU's native int8 path; on GPU, XLA's Triton GEMM fuses
the convert. The same code runs on CPU (the portable fallback).

Round trip: with scale = max|w| / 127 over the contracted axes, `dequantize(quantize(w))` differs
from w by at most scale / 2 per element (rounding to the nearest step).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

INT8_MAX = 127


@flax.struct.dataclass
class QuantArray:
    values: jax.Array  # int8, the weight's full shape
    scale: jax.Array  # float32, the weight's output (non-contracted) dims

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """values * scale for a weight (its scale covers the trailing, output dims). The KV cache's
        scales are applied inside `layers.attention` instead."""
        scale = self.scale.reshape((1,) * (self.values.ndim - self.scale.ndim) + self.scale.shape)
        return (self.values.astype(jnp.float32) * scale).astype(dtype)


def quantize(x, *, axis: int | tuple[int, ...], xp=jnp) -> QuantArray:
    """Symmetric int8 with one float32 scale per index of the axes not in `axis` (an int or a tuple,
    as in `np.max`): values x.shape, scale x.shape without `axis`.

    A weight reduces over its leading contracted axes (e.g. `axis=(0, 1)` for out [N, H, D]: a
    scale per output channel); the KV cache over the last axis (`axis=-1`: a scale per token and
    head, over head_dim). `axis` is keyword-only so that it never reads as a count of axes.
    `xp` is jnp (on device, inside jit) or np (on the host, while loading)."""
    x32 = xp.asarray(x, dtype=xp.float32)
    amax = xp.max(xp.abs(x32), axis=axis, keepdims=True)
    scale = xp.where(amax > 0, amax / INT8_MAX, 1.0).astype(xp.float32)
    values = xp.clip(xp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(xp.int8)
    return QuantArray(values=values, scale=xp.squeeze(scale, axis=axis))


def merge_leading(w, n: int):
    """w (an array or a QuantArray) with its first `n` axes merged into one. For a QuantArray these
    must be contracted axes (the scale is unchanged). Free in a row-major layout, and it pins that
    layout: see transformer.block, where XLA CPU otherwise transposed a weight on every step."""
    if isinstance(w, QuantArray):
        return QuantArray(values=merge_leading(w.values, n), scale=w.scale)
    return w.reshape((-1,) + w.shape[n:])


def _parse(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    return x, w, out


def einsum(spec: str, x: jax.Array, w) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in x's dtype, for w a plain array or a QuantArray.

    For a QuantArray, w's contracted axes must come first and its remaining axes must be the
    output's trailing axes, in order (true of every weight in this model), so the per-channel
    scale broadcasts onto the output."""
    if not isinstance(w, QuantArray):
        return jnp.einsum(spec, x, w.astype(x.dtype))
    _, w_sub, out_sub = _parse(spec)
    kept = "".join(c for c in w_sub if c in out_sub)
    if not (w_sub.endswith(kept) and out_sub.endswith(kept)) or w.scale.ndim != len(kept):
        raise ValueError(f"einsum {spec!r}: a quantized weight's output axes must trail both w and the output")
    out = jnp.einsum(spec, x, w.values.astype(x.dtype), preferred_element_type=jnp.float32)
    return (out * w.scale).astype(x.dtype)
