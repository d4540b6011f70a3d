"""Decode attention over a paged KV pool: one query token per row, per backend.

Layout (shared by all three implementations): per layer a pool k_pages, v_pages [N, P, page, H]
(heads first, like the dense cache's [B, N, S, H]); row b's sequence is the pages
block_tables[b, :] in order, of which positions 0..lengths[b]-1 are valid. int8 pools are
`quant.QuantArray`s: values [N, P, page, H], a float32 scale per token and head [N, P, page].

Implementations (`IMPLS`; `choose_impl` picks one per platform):
- "reference": pure JAX. Gathers the table's pages, [N, B, n*page, H], and runs the same float32
  scores, float32-minimum mask and softmax as `layers.attention`, so it equals the dense path on the
  equivalent cache. Reads n pages per row (the caller's page-count bucket), not the whole pool. The
  CPU path, and the fallback anywhere. int8: the scales factor out of both contractions as in
  `layers.attention`. Contractions are heads-major, like the gathered pages (only q and the output
  are transposed): on CPU as fast as gathering into [B, N, S, H], and 1.5-2x faster than contracting
  the [N, B, S, H] pages with batch-major q.
- "pallas_tpu": JAX's Pallas TPU kernel (`pallas.ops.tpu.paged_attention`), length-aware (it loops
  over `cdiv(length, page*ppcb)` blocks). It converts loaded K/V to bfloat16, so float32 pools are
  computed from bfloat16 K/V. Not for int8 pools: its int8 path broadcasts the scales to a float32
  array the size of the whole pool on every call (5 bytes per element read instead of bfloat16's 2).
  Lowers only for head_dim a multiple of 128 (GPT-J: 256; the tiny presets fall back).
- "pallas_gpu": JAX's Pallas Triton kernel (`pallas.ops.gpu.paged_attention`), length-aware (it
  skips key splits past the length); int8 pools pass their per-token-per-head scales straight in.
  Deprecated after JAX 0.11 (its import warns; the warning is silenced here).

Neither kernel applies a softmax scale: q is multiplied by 1/sqrt(H) before the call (exact in
bfloat16 for H = 256). Both multiply masked probabilities (0) into V, so a NaN anywhere in a page
they read, even past the length, poisons the row: pools must be created with zeros and recycled
pages hold finite data. A row of length 0 returns exactly 0 in every implementation.

With a multi-device `mesh`, the kernels run per chip under `shard_map` over the heads (mesh axis
`tp`): no collectives, each chip attends its own heads of every page. The reference needs none
(GSPMD partitions the gather and einsums over the sharded heads).
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from model.nn.quant import QuantArray
from model.nn.sharding import TP

IMPLS = ("reference", "pallas_tpu", "pallas_gpu")

TPU_INT8_FALLBACK = (
    "the Pallas TPU kernel expands int8 scales to a full-pool float32 array every call "
    "(more bytes read than bfloat16 pages); int8 KV on TPU uses the reference path"
)
# Mosaic's block-shape rule (last dim a multiple of 128 or the whole array dim) applied to the TPU
# kernel's [B, N, 1, 1] outputs blocked like q [B, N, 1, H]: only H % 128 == 0 lowers. Interpret
# mode does not check it.
TPU_HEAD_DIM_MULTIPLE = 128
# Custom-call targets of the kernels in lowered modules (the Triton one is
# jax.experimental.pallas.triton.CUSTOM_CALL_TARGET_NAME from JAX 0.11 on; same value in 0.10).
TPU_CUSTOM_CALL = "tpu_custom_call"
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
# Triton kernel blocking: keys per compute block (ppcb * page) and key splits per row (the grid's
# parallel axis over the sequence, merged by a log-sum-exp in XLA). 64 keys x H=256 keeps a K and a
# V block of the two pipeline stages within shared memory; tune on the device.
GPU_BLOCK_KEYS = 64
GPU_MAX_K_SPLITS = 8


def choose_impl(platform: str, kv_int8: bool, head_dim: int | None = None) -> tuple[str, str | None]:
    """The implementation for a platform ('cpu', 'tpu', 'gpu' or 'cuda') and KV dtype, with the
    reason when it falls back from the platform's kernel (None otherwise). Given `head_dim`, TPU
    also falls back when the kernel cannot lower it (see TPU_HEAD_DIM_MULTIPLE)."""
    if platform == "tpu":
        if kv_int8:
            return "reference", TPU_INT8_FALLBACK
        if head_dim is not None and head_dim % TPU_HEAD_DIM_MULTIPLE:
            return "reference", _tpu_head_dim_problem(head_dim)
        return "pallas_tpu", None
    if platform in ("gpu", "cuda"):
        return "pallas_gpu", None
    return "reference", None


def _tpu_head_dim_problem(head_dim: int) -> str:
    return (f"the Pallas TPU kernel needs head_dim a multiple of {TPU_HEAD_DIM_MULTIPLE} (its running max and "
            f"sum outputs [B, N, 1, 1] take q's block shape, whose last dim must then divide by 128); got {head_dim}")


def paged_attention(q: jax.Array, k_pages: jax.Array | QuantArray, v_pages: jax.Array | QuantArray,
                    lengths: jax.Array, block_tables: jax.Array, *, impl: str = "reference", mesh=None,
                    interpret: bool = False) -> jax.Array:
    """Attention of one query per row over its pages. q [B, N, H] (not pre-scaled); k_pages, v_pages
    [N, P, page, H] arrays or int8 QuantArrays; lengths int32 [B] (0 = empty row, output 0);
    block_tables int32 [B, n] (page ids in sequence order; entries past a row's pages may be any
    valid id, e.g. the trash page 0) -> [B, N, H] in q's dtype.

    `mesh`: with more than one device, the kernels run under shard_map over the heads.
    `interpret`: run the Pallas kernel in interpret mode (on CPU, for tests)."""
    if impl == "reference":
        return _reference(q, k_pages, v_pages, lengths, block_tables)
    if impl == "pallas_tpu":
        if isinstance(k_pages, QuantArray) or isinstance(v_pages, QuantArray):
            raise ValueError("pallas_tpu takes bfloat16/float32 pages only: " + TPU_INT8_FALLBACK
                             + " (choose_impl picks 'reference' for int8 KV on TPU)")
        if q.shape[-1] % TPU_HEAD_DIM_MULTIPLE:
            raise ValueError(_tpu_head_dim_problem(q.shape[-1]))
        kernel = _pallas_tpu(q.shape[-1], block_tables.shape[1], interpret)
    elif impl == "pallas_gpu":
        kernel = _pallas_gpu(q.shape[-1], k_pages.shape[2], block_tables.shape[1], interpret)
    else:
        raise ValueError(f"unknown paged attention impl {impl!r}; known: {IMPLS}")
    if mesh is not None and mesh.size > 1:
        kernel = _shard_over_heads(kernel, mesh)
    return kernel(q, k_pages, v_pages, lengths, block_tables)


def _reference(q, k_pages, v_pages, lengths, block_tables):
    """Gather the table's pages and attend as `layers.attention` does (same dtypes and mask)."""
    batch, n_heads, head_dim = q.shape
    n_pages = block_tables.shape[1]
    page = k_pages.shape[2]

    def gather(leaf):  # [N, P, page, ...] -> [N, B, S, ...] with S = n * page
        return leaf[:, block_tables].reshape((n_heads, batch, n_pages * page) + leaf.shape[3:])

    k_values = k_pages.values if isinstance(k_pages, QuantArray) else k_pages
    scores = jnp.einsum("NBH,NBSH->NBS", jnp.swapaxes(q, 0, 1).astype(jnp.float32),
                        gather(k_values).astype(jnp.float32))
    if isinstance(k_pages, QuantArray):
        scores = scores * gather(k_pages.scale)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    valid = jnp.arange(n_pages * page)[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
    # Zeroing the masked probabilities makes a length-0 row (uniform softmax over masked garbage) 0;
    # elsewhere they are already exactly 0.
    probs = jnp.where(valid, jax.nn.softmax(scores, axis=-1), 0.0)  # [N, B, S]
    v_values = v_pages
    if isinstance(v_pages, QuantArray):
        probs, v_values = probs * gather(v_pages.scale), v_pages.values
    out = jnp.einsum("NBS,NBSH->NBH", probs.astype(q.dtype), gather(v_values).astype(q.dtype))
    return jnp.swapaxes(out, 0, 1)


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int:
    return next(c for c in candidates if n % c == 0)


def _pallas_tpu(head_dim: int, n_pages: int, interpret: bool):
    """The TPU kernel as f(q, k, v, lengths, block_tables), q scaled by 1/sqrt(H). Pages per compute
    block: the largest of 8, 4, 2, 1 dividing n (the kernel needs ppcb | n). No megacore mode: a
    v5e chip has one TensorCore (megacore modes may hang there, and do in interpret mode)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged_attention

    ppcb = _largest_divisor(n_pages, (8, 4, 2, 1))

    def kernel(q, k_pages, v_pages, lengths, block_tables):
        scaled = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        call = lambda: tpu_paged_attention(scaled, k_pages, v_pages, lengths, block_tables,
                                           pages_per_compute_block=ppcb, megacore_mode=None)
        if not interpret:
            return call()
        with pltpu.force_tpu_interpret_mode():
            return call()

    return kernel


def _pallas_gpu(head_dim: int, page: int, n_pages: int, interpret: bool):
    """The Triton kernel as f(q, k, v, lengths, block_tables), q scaled by 1/sqrt(H). Key splits:
    gcd(n, 8) (the kernel needs k_splits | n); pages per compute block: the largest power of two
    <= GPU_BLOCK_KEYS / page dividing the pages per split (it needs ppcb | n / k_splits)."""
    with warnings.catch_warnings():  # JAX > 0.11: "pallas.ops.gpu is deprecated" on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_paged_attention

    k_splits = math.gcd(n_pages, GPU_MAX_K_SPLITS)
    ppcb = math.gcd(n_pages // k_splits, max(1, GPU_BLOCK_KEYS // page))

    def kernel(q, k_pages, v_pages, lengths, block_tables):
        scaled = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        k_scale = v_scale = None
        if isinstance(k_pages, QuantArray):
            k_pages, k_scale = k_pages.values, k_pages.scale
        if isinstance(v_pages, QuantArray):
            v_pages, v_scale = v_pages.values, v_pages.scale
        return gpu_paged_attention(scaled, k_pages, v_pages, block_tables, lengths,
                                   k_scales_pages=k_scale, v_scales_pages=v_scale, block_h=16,
                                   pages_per_compute_block=ppcb, k_splits=k_splits, interpret=interpret)

    return kernel


def _shard_over_heads(kernel, mesh):
    """`kernel` run per device on its heads: q [B, N/tp, H], pages (and scales) [N/tp, ...], the
    lengths and block tables replicated (page ids are global)."""
    from jax.sharding import PartitionSpec as P

    heads, rep = P(None, TP, None), P()
    # check_vma=False: the Pallas calls carry no varying-manual-axes annotations.
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, P(TP), P(TP), rep, rep), out_specs=heads,
                         check_vma=False)
