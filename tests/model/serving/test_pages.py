"""The page pool on its own: allocation, and the prefix cache (sharing, reference counts, eviction,
exact matching)."""

from model.serving.pages import PageLayout, PagePool

LAYOUT = PageLayout(page_size=4, num_pages=8, pages_per_seq=8)


def cached_pool(num_pages=8):
    return PagePool(PageLayout(page_size=4, num_pages=num_pages, pages_per_seq=8), slots=3, prefix_caching=True)


def test_allocation_takes_the_lowest_free_pages_and_free_gives_them_back():
    pool = PagePool(LAYOUT, slots=2)
    assert pool.allocate(0, 9) and pool.pages_of(0) == [1, 2, 3]
    assert not pool.allocate(1, 25)  # 7 pages, 5 free: all or nothing
    assert pool.pages_of(1) == [] and pool.pages_free == 5
    pool.free(0)
    assert pool.pages_free == 8 and pool.table[0].tolist() == [0] * 8


def test_a_new_sequence_shares_the_cached_full_pages_of_its_prefix():
    pool = cached_pool()
    prompt = list(range(10))  # pages [0..3], [4..7], and 2 tokens of a third
    assert pool.admit(0, prompt) == 0
    pool.register(0, prompt)
    assert pool.pages_cached == 2  # only full pages
    shared = pool.admit(1, prompt[:8] + [99, 98, 97])
    assert shared == 8 and pool.pages_of(1)[:2] == pool.pages_of(0)[:2]
    assert pool.pages_of(1)[2] not in pool.pages_of(0)  # its own page from the first token that differs
    assert pool.admit(2, prompt[:8]) == 4  # never the page of the last token: it must be computed


def test_matching_is_exact_and_chained():
    pool = cached_pool()
    pool.admit(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    pool.register(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert pool.cached_prefix([1, 2, 3, 0, 5, 6, 7, 8, 9]) == []  # one token differs in the first page
    assert pool.cached_prefix([0, 0, 0, 0, 5, 6, 7, 8, 9]) == []  # same second page after another first
    assert pool.cached_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0]) == pool.pages_of(0)[:2]


def test_released_cached_pages_stay_until_the_pool_needs_them_least_recently_released_first():
    pool = cached_pool(num_pages=6)
    a, b = list(range(0, 9)), list(range(100, 109))
    for slot, tokens in ((0, a), (1, b)):
        pool.admit(slot, tokens)
        pool.register(slot, tokens)
    pool.free(0)
    pool.free(1)
    assert pool.pages_free == 6 and pool.pages_used == 0 and pool.pages_cached == 4  # cached pages count as free
    assert pool.admit(2, list(range(200, 213))) == 0  # nothing shared; 4 pages: 2 free ones, then a's two cached (released first)
    assert pool.cached_prefix(a) == [] and len(pool.cached_prefix(b)) == 2


def test_a_shared_page_is_freed_only_when_its_last_holder_leaves():
    pool = cached_pool()
    pool.admit(0, list(range(9)))
    pool.register(0, list(range(9)))
    pool.admit(1, list(range(9)))
    pool.free(0)
    assert pool.pages_used == 3  # slot 1's two shared pages and its own
    pool.free(1)
    assert pool.pages_used == 0
