"""A mock engine whose every output a person can compute by hand (JetStream's `mock_engine.py`).

It implements the whole engine API without a model, so the host side (scheduler, output
processing, driver) and the serving app can be tested for what they do (admission, batching,
cancellation, streaming order, overload, faults) rather than for the model's numbers, quickly.

The arithmetic, over a vocabulary of `vocab_size` ids (GPT-2's 50257 by default):
- a prompt's first generated token is its last token + 1, and every decode step's token is the
  slot's previous token + 1 (all mod vocab_size): prompt [.., t] generates t+1, t+2, t+3, ...;
- every token's logprob is -(token % 4) / 4 (exact in float32: 0, -0.25, -0.5, -0.75);
- the candidates a row reports (`top_tokens`) after last token t are t+1, t+2, ..., the j-th with
  logprob -((t+1) % 4) / 4 - j, so beam search follows t+1, t+2, ... too (best first: the sampled one);
- sampling settings are ignored (every request decodes as above, seeded or not; penalties, biases
  and min_tokens too);
- prompt scores (a row's `score_prompt`): position p, after token x, scores the token that follows
  with logprob -(token % 4) / 4, and its most likely tokens are x+1, x+2, ... (what the mock would
  generate there), with the same logprobs.
So with GPT-2's vocabulary a prompt ending in t reaches <|endoftext|> (50256) after 50256 - t tokens.

Pages: the mock has no KV cache, but it reports a page layout (`page_size`, `num_pages`, by default
enough for every slot's longest sequence) so the scheduler's page accounting, admission by pages and
preemption run on it exactly as on a real engine; a small `num_pages` makes preemption happen.
Recomputing a preempted request is exact here too: prefill of prompt + generated continues at the
last token.

A prefill that continues `existing_prefix` (a chunk of a long prompt, `prefill_chunk_tokens`)
generates from the chunk's last token, which is the whole prompt's when the chunk is its last;
`free_resource` records the slots it was told to free (`freed`), so tests can check that the
driver releases what every finished request held.

Time: `step_delay_s` makes each prefill and decode step sleep that long (a stand-in for a device), so
a generation lasts long enough to be interrupted; `wedge()` makes the next step block until
`unwedge()` (a device call that never returns).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Sequence

import numpy as np

from model.engine import api
from model.engine.buckets import smallest_fitting
from model.nn.config import ENDOFTEXT_ID, GPT2_VOCAB_SIZE
from model.serving.pages import PageLayout, PagePool, cdiv
from model.serving.request import Limits


def mock_logprob(tokens: np.ndarray) -> np.ndarray:
    """The mock's logprob of each token: -(token % 4) / 4."""
    return -(np.asarray(tokens) % 4).astype(np.float32) / 4


@dataclasses.dataclass
class MockPromptScores:
    logprobs: np.ndarray  # [rows, T]
    top_tokens: np.ndarray  # [rows, T, k]
    top_logprobs: np.ndarray  # [rows, T, k]


@dataclasses.dataclass
class MockPrefix:
    prompts: list[list[int]]  # every row's prompt (or chunk)
    tokens: np.ndarray  # [rows] first generated token
    logprobs: np.ndarray  # [rows]
    top_tokens: np.ndarray  # [rows, K]
    top_logprobs: np.ndarray  # [rows, K]
    prompt: MockPromptScores  # every row's, asked for or not


@dataclasses.dataclass
class MockDecodeState:
    tokens: np.ndarray  # [slots] last token of each slot (an empty slot counts on too; the driver ignores it)


@dataclasses.dataclass
class MockStepOutput:
    tokens: np.ndarray  # [slots]
    logprobs: np.ndarray  # [slots]
    top_tokens: np.ndarray  # [slots, K]
    top_logprobs: np.ndarray  # [slots, K]


class MockEngine(api.Engine):
    """See the module docstring."""

    def __init__(self, slots: int = 4, prompt_buckets: Sequence[int] = (16, 64), max_prefill_batch: int = 4,
                 max_total_length: int = 256, vocab_size: int = GPT2_VOCAB_SIZE, eos_token_id: int = ENDOFTEXT_ID,
                 step_delay_s: float = 0.0, page_size: int = 16, num_pages: int | None = None,
                 prefill_chunk_tokens: int | None = None, enable_prefix_caching: bool = False, max_beams: int | None = None):
        pages_per_seq = cdiv(max_total_length, page_size)
        self._layout = PageLayout(page_size, num_pages or slots * pages_per_seq, pages_per_seq)
        max_beams = min(4, slots) if max_beams is None else max_beams  # as the paged engine's default
        self._limits = Limits(vocab_size, tuple(prompt_buckets), max_total_length, self._layout.capacity_tokens,
                              max_beams, page_size)
        self._candidates = 2 * max_beams + 1
        self._chunk = prefill_chunk_tokens
        self._prefix_caching = enable_prefix_caching
        preemptible = self._layout.num_pages < slots * pages_per_seq  # then recomputes need the whole context
        longer = (max_total_length,) if preemptible and prompt_buckets[-1] < max_total_length else ()
        self._prefill_buckets = tuple(prompt_buckets) + longer  # as the paged engine's
        if prefill_chunk_tokens is not None:
            needed = prompt_buckets[-1] >= prefill_chunk_tokens or preemptible
            self._prefill_buckets = (tuple(b for b in prompt_buckets if b < prefill_chunk_tokens)
                                     + ((prefill_chunk_tokens,) if needed else ()))
        self._slots = slots
        self._max_prefill_batch = max_prefill_batch
        self._eos = eos_token_id
        self.step_delay_s = step_delay_s
        self.freed: list[int] = []
        self.prefill_batches: list[int] = []  # the size of every prefill call
        self._unwedged = threading.Event()
        self._unwedged.set()

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def max_prefill_batch(self) -> int:
        return self._max_prefill_batch

    @property
    def page_layout(self) -> PageLayout:
        return self._layout

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        return self._prefill_buckets

    @property
    def prefill_chunk_tokens(self) -> int | None:
        return self._chunk

    @property
    def prefix_caching(self) -> bool:
        return self._prefix_caching

    @property
    def top_candidates(self) -> int:
        return self._candidates

    # -- the lifecycle --------------------------------------------------------------------------

    def init_decode_state(self) -> MockDecodeState:
        return MockDecodeState(np.zeros(self._slots, np.int32))

    def prefill(self, prompts, params, existing_prefix: api.PoolPrefix | None = None, steps=None,
                sequences=None) -> MockPrefix:
        if not prompts or len(prompts) > self._max_prefill_batch:
            raise ValueError(f"prefill of {len(prompts)} prompts; 1 to {self._max_prefill_batch} fit")
        if existing_prefix is not None:
            if self._chunk is None or len(prompts) != 1 or len(prompts[0]) > self._chunk:
                raise ValueError(f"continuing a prefix takes one prompt of at most prefill_chunk_tokens={self._chunk}")
        elif smallest_fitting(max(len(p) for p in prompts), self._prefill_buckets) is None:
            raise ValueError(f"a prompt exceeds the largest prefill bucket {self._prefill_buckets[-1]}")
        self._tick()
        self.prefill_batches.append(len(prompts))
        tokens = np.array([(p[-1] + 1) % self._limits.vocab_size for p in prompts], np.int32)
        start = existing_prefix.start if existing_prefix is not None else 0
        return MockPrefix([list(p) for p in prompts], tokens, mock_logprob(tokens), *self._top(tokens),
                          self._score(prompts, sequences or prompts, start))

    def _score(self, prompts, sequences, start: int) -> MockPromptScores:
        """The prompt scores of the module docstring; a row's last position scores the token after it
        in its sequence (0 when there is none)."""
        t, k, vocab = max(len(p) for p in prompts), max(self._limits.max_top_logprobs, 1), self._limits.vocab_size
        targets = np.zeros((len(prompts), t), np.int64)
        tops = np.zeros((len(prompts), t, k), np.int64)
        for row, (prompt, seq) in enumerate(zip(prompts, sequences)):
            after = list(seq[start + 1 : start + len(prompt) + 1])
            targets[row, : len(after)] = after
            tops[row, : len(prompt)] = (np.asarray(prompt)[:, None] + 1 + np.arange(k)[None, :]) % vocab
        return MockPromptScores(mock_logprob(targets), tops.astype(np.int32), mock_logprob(tops))

    def insert(self, prefix: MockPrefix, state: MockDecodeState, slots: Sequence[int], pages: PagePool,
               start: int = 0) -> MockDecodeState:
        tokens = state.tokens.copy()
        tokens[list(slots)] = prefix.tokens[: len(slots)]
        return MockDecodeState(tokens)

    def generate(self, state: MockDecodeState, pages: PagePool) -> tuple[MockDecodeState, MockStepOutput]:
        self._tick()
        tokens = ((state.tokens + 1) % self._limits.vocab_size).astype(np.int32)
        return MockDecodeState(tokens), MockStepOutput(tokens, mock_logprob(tokens), *self._top(tokens))

    def _top(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's candidates: tokens t, t+1, ... with logprobs logprob(t), logprob(t) - 1, ..."""
        j = np.arange(self._candidates)
        top = ((tokens[:, None] + j[None, :]) % self._limits.vocab_size).astype(np.int32)
        return top, (mock_logprob(tokens)[:, None] - j[None, :]).astype(np.float32)

    def fork(self, state: MockDecodeState, forks, copies) -> MockDecodeState:
        if len(forks) > self._slots or len(copies) > self._slots:
            raise ValueError(f"{len(forks)} forks and {len(copies)} copies: at most {self._slots} of each")
        tokens = state.tokens.copy()
        for dst, _, token in forks:
            tokens[dst] = token
        return MockDecodeState(tokens)

    def free_resource(self, slot: int) -> None:
        self.freed.append(slot)

    def warmup(self, progress: bool = True) -> float:
        return self._warmed_up(self._warmup_started())

    # -- faults ---------------------------------------------------------------------------------

    def wedge(self) -> None:
        """Block the next prefill or decode step until `unwedge()`."""
        self._unwedged.clear()

    def unwedge(self) -> None:
        self._unwedged.set()

    def _tick(self) -> None:
        self._unwedged.wait()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
