"""Bucket selection: the one place that picks the static shape a size is padded to. No JAX, so the
batcher (a CPU deployment) groups requests by exactly the prompt bucket the engine will use.

Engines compile one program per bucket; a size is padded to the smallest bucket that holds it.
"""

from __future__ import annotations

from typing import Sequence


def smallest_fitting(size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket >= size (buckets sorted ascending), or None when none holds it."""
    return next((b for b in buckets if size <= b), None)


def fit_prompt_buckets(buckets: Sequence[int], cache_len: int) -> tuple[int, ...]:
    """The prompt buckets that fit a `cache_len`-position cache, plus one of the cache's length in
    place of those that do not: a checkpoint's context (n_positions) is known only once it is loaded,
    and a small checkpoint should still serve with the default buckets."""
    fitting = tuple(b for b in buckets if b <= cache_len)
    return fitting if len(fitting) == len(buckets) else fitting + (cache_len,)
