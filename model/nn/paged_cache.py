"""The paged KV cache on the device: per layer a pool of fixed-size pages, written in place.

Layout per layer, for keys and for values: [N, P, page, H] (heads, pages, positions in a page, head
dim), the layout JAX's Pallas paged-attention kernels take for TPU and GPU (model.nn.paged_attention).
Heads first, so a 4-chip mesh splits every page by heads (chip c holds heads of every page; page
ids are global and the host's block tables are replicated). With `quantized`, each leaf is a
QuantArray: int8 values [N, P, page, H] and a float32 scale per token and head [N, P, page].

Which page holds which position is the host's business (model.serving.pages): a sequence's block
table lists its pages in order, position p lives in page `table[p // page]` at offset `p % page`.
Page 0 is the trash page: never allocated, it takes the writes of free slots and padding rows. The
pool is created with zeros and every write stores finite values, because the kernels multiply the
masked positions of a page they read by probability 0, and a NaN there would still poison the sum.

Two writes, both scatters over whole pages or single positions, donated so XLA updates in place:
`write_prompt` (after prefill: a prompt's dense keys and values, page by page, from any page of its
sequence on) and `write_token` (each decode step: one position per row). `gather_pages` reads
sequences back densely, for a prefill that continues a prefix already in the pool.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from model.nn import sharding
from model.nn.config import GPTJConfig
from model.nn.quant import QuantArray, quantize
from model.nn.sharding import HEAD_DIM, HEADS, PAGE_SLOT, PAGES, ParamSpec

TRASH_PAGE = 0  # never allocated; free slots and padding rows write here


@flax.struct.dataclass
class PagedKV:
    k: tuple[jax.Array | QuantArray, ...]  # per layer [N, P, page, H]
    v: tuple[jax.Array | QuantArray, ...]

    @staticmethod
    def param_specs(cfg: GPTJConfig, total_pages: int, page_size: int, dtype, quantized: bool = False) -> "PagedKV":
        """`total_pages` counts the trash page."""
        kv = ParamSpec((cfg.n_heads, total_pages, page_size, cfg.head_dim), dtype, (HEADS, PAGES, PAGE_SLOT, HEAD_DIM))
        if quantized:
            kv = sharding.quantized(kv, axis=-1)
        return PagedKV(k=(kv,) * cfg.n_layers, v=(kv,) * cfg.n_layers)

    @property
    def page_size(self) -> int:
        return _pages_values(self.k[0]).shape[2]

    @staticmethod
    def bytes_per_page(cfg: GPTJConfig, page_size: int, dtype, quantized: bool = False) -> int:
        """Bytes one page costs across all layers (k and v, scales included), over the whole mesh."""
        per_head = cfg.head_dim + 4 if quantized else cfg.head_dim * jnp.dtype(dtype).itemsize
        return 2 * cfg.n_layers * cfg.n_heads * per_head * page_size


def _pages_values(leaf):
    return leaf.values if isinstance(leaf, QuantArray) else leaf


def write_prompt(leaf: jax.Array | QuantArray, new: jax.Array | QuantArray, page_ids: jax.Array) -> jax.Array | QuantArray:
    """Write prompts' keys or values new [b, N, T, H] (as prefill computed them: arrays, or int8
    QuantArrays with scales [b, N, T]) into pages page_ids [b, cdiv(T, page)]: row r's positions
    i*page .. (i+1)*page-1 go to page page_ids[r, i]. T is padded up to whole pages; pages a row
    does not use point at the trash page."""
    page = _pages_values(leaf).shape[2]
    b, n_pages = page_ids.shape

    def scatter(dst, src):  # dst [N, P, page, (H)], src [b, N, T, (H)]
        t = src.shape[2]
        pad = [(0, 0)] * src.ndim
        pad[2] = (0, n_pages * page - t)
        src = jnp.pad(src, pad).reshape(b, src.shape[1], n_pages, page, *src.shape[3:])
        src = jnp.moveaxis(src, 1, 0).reshape(src.shape[1], b * n_pages, page, *src.shape[4:])  # [N, b*n, page, (H)]
        return dst.at[:, page_ids.reshape(-1)].set(src.astype(dst.dtype))

    if isinstance(leaf, QuantArray):
        return QuantArray(values=scatter(leaf.values, new.values), scale=scatter(leaf.scale, new.scale))
    return scatter(leaf, new)


def gather_pages(leaf: jax.Array | QuantArray, tables: jax.Array) -> jax.Array | QuantArray:
    """The sequences whose pages are tables [B, n], densely: [B, N, n*page, (H)] from the pool
    leaf [N, P, page, (H)] (arrays, or int8 values and scales): a prefix to continue from."""
    def gather(x):
        g = x[:, tables]  # [N, B, n, page, (H)]
        g = g.reshape(x.shape[0], tables.shape[0], tables.shape[1] * x.shape[2], *x.shape[3:])
        return jnp.moveaxis(g, 0, 1)

    if isinstance(leaf, QuantArray):
        return QuantArray(values=gather(leaf.values), scale=gather(leaf.scale))
    return gather(leaf)


def write_token(leaf: jax.Array | QuantArray, new: jax.Array, page_ids: jax.Array, offsets: jax.Array) -> jax.Array | QuantArray:
    """Write one new key or value per row, new [B, N, H], at (page_ids [B], offsets [B]); quantized
    per token and head when the pool is int8. Rows that hold no request write to the trash page."""
    def scatter(dst, src):  # dst [N, P, page, (H)], src [B, N, (H)]
        return dst.at[:, page_ids, offsets].set(jnp.moveaxis(src, 0, 1).astype(dst.dtype))

    if isinstance(leaf, QuantArray):
        q = quantize(new, axis=-1)  # values [B, N, H], scale [B, N]
        return QuantArray(values=scatter(leaf.values, q.values), scale=scatter(leaf.scale, q.scale))
    return scatter(leaf, new)
