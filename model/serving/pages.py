"""The KV cache's pages on the host: which pages each decode slot's sequence holds (vLLM's
`BlockTable` and block pool, JetStream's `KVCacheManager`).

The engine keeps, per layer, a pool of fixed-size pages on the device (model.nn.paged_cache); this
module decides which page holds which positions. A sequence of L tokens in slot s holds
cdiv(L, page_size) pages, listed in order in `table[s]`; position p of the sequence lives in page
`table[s, p // page_size]` at offset `p % page_size`. Page 0 is the trash page: never handed out,
the target of every write a free slot or a padding row makes, and what unused table entries point
at. Pages are taken as a sequence grows (one page every `page_size` tokens) and all given back when
it ends, so memory follows the tokens held, not `slots x max_cache_len`.

`lengths[s]` is how many tokens slot s's pages hold now (0: the slot is free); the next decode step
writes position `lengths[s]` and attends over `lengths[s] + 1` tokens. The scheduler owns the pool
(admission, growth, preemption: model.serving.scheduler); the engine only reads `table` and
`lengths` when it runs a step. Plain numpy, owned by one thread.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from model.nn.paged_cache import TRASH_PAGE


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class PageLayout:
    """The shape of an engine's page pool."""

    page_size: int  # tokens per page
    num_pages: int  # pages that can be handed out (the trash page not counted)
    pages_per_seq: int  # the most pages one sequence holds: cdiv(max_cache_len, page_size)

    def pages_for(self, tokens: int) -> int:
        return cdiv(tokens, self.page_size)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_pages * self.page_size


class PagePool:
    """Free pages and every slot's block table (see the module docstring)."""

    def __init__(self, layout: PageLayout, slots: int):
        self.layout = layout
        self.table = np.zeros((slots, layout.pages_per_seq), np.int32)
        self.lengths = np.zeros((slots,), np.int32)
        self._free = list(range(layout.num_pages, 0, -1))  # a stack: the lowest page id is handed out first
        self._held = np.zeros((slots,), np.int32)  # pages in table[s]

    @property
    def pages_free(self) -> int:
        return len(self._free)

    @property
    def pages_used(self) -> int:
        return self.layout.num_pages - len(self._free)

    def pages_needed(self, slot: int, tokens: int) -> int:
        """Pages slot `slot` must still take to hold `tokens` tokens."""
        return max(self.layout.pages_for(tokens) - int(self._held[slot]), 0)

    def allocate(self, slot: int, tokens: int) -> bool:
        """Give `slot` the pages to hold `tokens` tokens, if there are enough free: all or nothing."""
        need = self.pages_needed(slot, tokens)
        if tokens > self.layout.pages_per_seq * self.layout.page_size:
            raise ValueError(f"{tokens} tokens exceed a sequence's {self.layout.pages_per_seq} pages")
        if need > len(self._free):
            return False
        held = int(self._held[slot])
        for i in range(held, held + need):
            self.table[slot, i] = self._free.pop()
        self._held[slot] = held + need
        return True

    def free(self, slot: int) -> None:
        """Give back every page `slot` holds; the slot is empty."""
        held = int(self._held[slot])
        self._free.extend(int(p) for p in self.table[slot, :held][::-1])
        self.table[slot] = TRASH_PAGE
        self._held[slot] = 0
        self.lengths[slot] = 0

    def pages_of(self, slot: int) -> list[int]:
        return self.table[slot, : int(self._held[slot])].tolist()
