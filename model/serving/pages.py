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

import collections
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


class CachedPage:
    """One full page of tokens in the prefix cache. Its key in the cache is (the CachedPage before
    it, or None for a sequence's first page; its tokens): a lookup compares every token and the
    identity of the page before, so two different prefixes can never be taken for one another
    (vLLM chains a hash of the same things; here the dictionary's equality check is the guarantee)."""

    __slots__ = ("page", "key")

    def __init__(self, page: int, key: tuple):
        self.page = page
        self.key = key


class PagePool:
    """Free pages and every slot's block table (see the module docstring).

    With `prefix_caching`, full pages are also a cache (vLLM's automatic prefix caching): a page
    whose tokens are known is registered under its prefix (`register`); `admit` gives a new
    sequence every cached page of its longest cached prefix (shared, reference-counted), so only
    the rest is prefilled. A page nobody holds any more stays cached, evictable, and is reused
    least recently released first when no free page is left. Shared pages are full and before
    every position a sequence writes, so sharing never needs a copy.

    Beam search (`fork`): the beams of a request share every full page of their common history;
    each holds its own last, partial page, a copy of its parent's when two beams continue one.
    Pages `reserve`d are kept back from everyone else (a beam request's first fork needs a page
    per beam beyond the first)."""

    def __init__(self, layout: PageLayout, slots: int, prefix_caching: bool = False):
        self.layout = layout
        self.prefix_caching = prefix_caching
        self.table = np.zeros((slots, layout.pages_per_seq), np.int32)
        self.lengths = np.zeros((slots,), np.int32)
        self._free = list(range(layout.num_pages, 0, -1))  # a stack: the lowest page id is handed out first
        self._held = np.zeros((slots,), np.int32)  # pages in table[s]
        self._refs = np.zeros((layout.num_pages + 1,), np.int32)  # slots holding each page
        self._cache: dict[tuple, CachedPage] = {}  # (previous CachedPage | None, tokens) -> page
        self._cached_of: dict[int, CachedPage] = {}  # page -> its entry
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, held by nobody
        self._reserved = 0  # pages promised (`reserve`), not yet taken

    @property
    def pages_free(self) -> int:
        """Pages a sequence can take: free ones and cached ones nobody holds, less those reserved."""
        return len(self._free) + len(self._evictable) - self._reserved

    @property
    def pages_used(self) -> int:
        return self.layout.num_pages - self.pages_free

    @property
    def pages_cached(self) -> int:
        return len(self._cached_of)

    def pages_needed(self, slot: int, tokens: int) -> int:
        """Pages slot `slot` must still take to hold `tokens` tokens."""
        return max(self.layout.pages_for(tokens) - int(self._held[slot]), 0)

    def allocate(self, slot: int, tokens: int) -> bool:
        """Give `slot` the pages to hold `tokens` tokens, if there are enough free: all or nothing."""
        need = self.pages_needed(slot, tokens)
        if tokens > self.layout.pages_per_seq * self.layout.page_size:
            raise ValueError(f"{tokens} tokens exceed a sequence's {self.layout.pages_per_seq} pages")
        if need > self.pages_free:
            return False
        held = int(self._held[slot])
        for i in range(held, held + need):
            self.table[slot, i] = self._take()
        self._held[slot] = held + need
        return True

    def _take(self) -> int:
        """A free page, else the least recently released cached one (leaving the cache)."""
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._evictable.popitem(last=False)
            entry = self._cached_of.pop(page)
            del self._cache[entry.key]
        self._refs[page] = 1
        return page

    def cached_prefix(self, tokens: list[int]) -> list[int]:
        """The cached pages of `tokens`' longest cached prefix of full pages, never the page of the last
        token (it must be computed, for its logits)."""
        page, found, previous = self.layout.page_size, [], None
        if self.prefix_caching:
            for i in range((len(tokens) - 1) // page):
                entry = self._cache.get((previous, tuple(tokens[i * page:(i + 1) * page])))
                if entry is None:
                    break
                found.append(entry.page)
                previous = entry
        return found

    def admit(self, slot: int, tokens: list[int], shared: list[int] | None = None, reserve: int = 0) -> int | None:
        """Pages for a new sequence of `tokens` in empty `slot`, plus its first decode token: every
        cached page of its longest cached prefix, shared (never the page of its last token, which
        must be computed for its logits), and new pages for the rest; and `reserve` more pages kept
        back for it (`reserve`). Returns how many tokens the shared pages hold, or None (nothing
        taken) when the rest does not fit. `shared`: the prefix's pages when the caller has just
        looked them up (`cached_prefix`); [] shares nothing."""
        shared = self.cached_prefix(tokens) if shared is None else shared
        reusable = sum(1 for p in shared if self._refs[p] == 0)  # evictable now, not once shared
        if self.layout.pages_for(len(tokens) + 1) - len(shared) + reserve > self.pages_free - reusable:
            return None
        for i, p in enumerate(shared):
            self._refs[p] += 1
            self._evictable.pop(p, None)
            self.table[slot, i] = p
        self._held[slot] = len(shared)
        allocated = self.allocate(slot, len(tokens) + 1)  # fits: counted above
        assert allocated
        self._reserved += reserve
        return len(shared) * self.layout.page_size

    def unreserve(self, pages: int) -> None:
        """Give back `pages` reserved pages (to be taken now, or by anyone)."""
        if not 0 <= pages <= self._reserved:
            raise ValueError(f"unreserving {pages} pages; {self._reserved} are reserved")
        self._reserved -= pages

    def fork(self, slots: list[int], parents: list[int], length: int) -> list[tuple[int, int]]:
        """Beam search: the sequence in slots[j] becomes a copy of the `length`-token sequence in slot
        parents[j] (each parent one of `slots`; any may have several children, or none). Each
        shares its parent's full pages; the parent's page of position `length`, if it holds one, goes
        to its first child, and every other child gets a new page, a copy of it when it is partial.
        Returns the copies the device must make, [(source page, new page)]. Pages no beam holds any
        more are freed first, so a fork needs new pages only for beams beyond their parents' count:
        pages the caller has kept free (a request's first fork: `reserve`)."""
        page, tail = self.layout.page_size, length // self.layout.page_size
        before = {s: self.pages_of(s) for s in slots}
        rows, needs_page, inherited = [], [], set()
        for j, p in enumerate(parents):
            row = before[p][:tail]
            if len(before[p]) > tail:  # the parent holds the page `length` is written to
                if p in inherited:
                    needs_page.append(j)
                else:
                    row.append(before[p][tail])
                    inherited.add(p)
            rows.append(row)
        for row in rows:
            for pg in row:
                self._refs[pg] += 1
        for s in slots:
            for pg in before[s]:
                self._release_page(pg)
        copies = []
        for j in needs_page:
            rows[j].append(self._take())
            if length % page:
                copies.append((before[parents[j]][tail], rows[j][-1]))
        for s, row in zip(slots, rows):
            self.table[s] = TRASH_PAGE
            self.table[s, : len(row)] = row
            self._held[s] = len(row)
            self.lengths[s] = length
        return copies

    def register(self, slot: int, tokens: list[int]) -> None:
        """Cache slot `slot`'s full pages whose tokens are `tokens` (its sequence from position 0, as
        far as its keys and values are written). A prefix cached already keeps its page."""
        if not self.prefix_caching:
            return
        page, previous = self.layout.page_size, None
        for i in range(min(len(tokens) // page, int(self._held[slot]))):
            key = (previous, tuple(tokens[i * page:(i + 1) * page]))
            entry = self._cache.get(key)
            if entry is None:
                p = int(self.table[slot, i])
                if p in self._cached_of:  # this page is cached under another prefix: stop here
                    return
                entry = self._cache[key] = self._cached_of[p] = CachedPage(p, key)
            previous = entry

    def free(self, slot: int) -> None:
        """Give back every page `slot` holds; the slot is empty. A cached page nobody holds any more
        stays cached, evictable."""
        held = int(self._held[slot])
        for p in (int(p) for p in self.table[slot, :held][::-1]):
            self._release_page(p)
        self.table[slot] = TRASH_PAGE
        self._held[slot] = 0
        self.lengths[slot] = 0

    def _release_page(self, p: int) -> None:
        """One holder fewer for page `p`: free (or cached, evictable) when it was the last."""
        self._refs[p] -= 1
        if self._refs[p] == 0:
            if p in self._cached_of:
                self._evictable[p] = None
            else:
                self._free.append(p)

    def pages_of(self, slot: int) -> list[int]:
        return self.table[slot, : int(self._held[slot])].tolist()
