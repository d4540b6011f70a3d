"""Beam search on the host, step for step by transformers' rules (`GenerationMixin._beam_search` in
transformers 4.50+ / 5.x, with `early_stopping` True or False), so that its beams, and its scores
(`sequences_scores`), are transformers' own on the same logits.

The engine decodes each beam of a request in a slot of its own and reports each slot's most likely
next tokens (`top_tokens`, `top_logprobs`: the model's own log-softmax). One `step` here takes those
candidates for every running beam and decides the next running beams, as transformers does:

- a candidate's score is its beam's running score (the sum of its tokens' logprobs) plus its own
  logprob; EOS is barred while fewer than `min_new_tokens` tokens are generated;
- the best 2k candidates over all beams are kept (k = num_beams). A candidate that ends its beam
  (EOS, or the `max_new_tokens`-th token) is a finished hypothesis if it ranks in the first k,
  scored sum / generated_length ** length_penalty (EOS counted), and joins the k best finished
  unless those are full and `early_stopping`, or the search cannot improve any more; the best k
  candidates that do not end are the next running beams;
- the search ends when k hypotheses are finished and `early_stopping`, when no running beam can
  still beat the worst finished one (transformers' heuristic: the best running score divided by the
  current length ** length_penalty), or at `max_new_tokens`.

The best 2k candidates over all beams are always among each beam's own best 2k, so 2k candidates per
beam (2k + 1 while EOS is barred, one of them may be EOS) are all a step needs. Scores are float32
and the -1e9 offsets are transformers', so ties and orders come out the same. Before the first
step there is one running beam (transformers starts the other k - 1 at -1e9, so none of their
candidates can rank). Plain numpy, no engine calls: the driver maps beams to slots and pages.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

_NEG = np.float32(-1.0e9)  # transformers' "never choose this" offset, in its float32


@dataclasses.dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens (EOS included when it ended on it)
    logprobs: list[float]  # the model's own logprob of each
    score: np.float32  # running: sum of logprobs; finished: that over length ** length_penalty


class BeamSearch:
    """One request's beam search (see the module docstring)."""

    def __init__(self, num_beams: int, max_new_tokens: int, eos_token_id: int, min_new_tokens: int = 0,
                 length_penalty: float = 1.0, early_stopping: bool = True):
        self.k = num_beams
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.eos = eos_token_id
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.running = [Hypothesis([], [], np.float32(0.0))]
        self._finished: list[Hypothesis | None] = [None] * num_beams  # best first, transformers' k slots
        self._finished_scores = np.full((num_beams,), _NEG, np.float32)
        self._is_finished = np.zeros((num_beams,), bool)
        self._improvable = True
        self.done = False

    @property
    def generated(self) -> int:
        """Tokens each running beam has generated."""
        return len(self.running[0].tokens)

    @property
    def finished(self) -> list[Hypothesis]:
        """The finished hypotheses, best first (all k once the search is done)."""
        return [h for h, done in zip(self._finished, self._is_finished) if done]

    def step(self, top_tokens: Sequence[Sequence[int]], top_logprobs: Sequence[Sequence[float]]) -> list[int]:
        """Extend the running beams from their candidates (row i: running beam i's most likely tokens,
        best first, and their logprobs). Returns, for each new running beam j, the index of the old
        running beam it extends (its last token is `running[j].tokens[-1]`); sets `done` when the
        search has ended (then the result is `finished`)."""
        if self.done:
            raise RuntimeError("the beam search has ended")
        if len(top_tokens) != len(self.running):
            raise ValueError(f"candidates for {len(top_tokens)} beams; {len(self.running)} are running")
        k, cur = self.k, self.generated
        barred = cur < self.min_new_tokens
        candidates = []  # (score, parent, token, logprob)
        for i, (beam, tokens, logprobs) in enumerate(zip(self.running, top_tokens, top_logprobs)):
            own = [(int(t), float(lp)) for t, lp in zip(tokens, logprobs) if not (barred and int(t) == self.eos)]
            if len(own) < 2 * k:
                raise ValueError(f"beam {i} has {len(own)} candidates; {2 * k} are needed")
            candidates += [(np.float32(beam.score + np.float32(lp)), i, t, lp) for t, lp in own[: 2 * k]]
        order = sorted(range(len(candidates)), key=lambda c: -candidates[c][0])[: 2 * k]
        candidates = [candidates[c] for c in order]
        scores = np.array([c[0] for c in candidates], np.float32)
        ends = np.array([t == self.eos or cur + 1 >= self.max_new_tokens for _, _, t, _ in candidates])
        extended = [Hypothesis(self.running[i].tokens + [t], self.running[i].logprobs + [lp], score)
                    for score, i, t, lp in candidates]

        # The next running beams: the best k candidates that do not end (transformers' offsets).
        running_scores = scores + ends.astype(np.float32) * _NEG
        keep = _top(running_scores, k)
        parents = [candidates[c][1] for c in keep]
        self.running = [dataclasses.replace(extended[c], score=running_scores[c]) for c in keep]

        # Finished hypotheses: candidates among the first k that end, if they beat the k best so far.
        just_finished = ends & (np.arange(len(candidates)) < k)
        final = scores / np.float32((cur + 1) ** self.length_penalty)
        final += _NEG * np.float32(bool(self._is_finished.all() and self.early_stopping))
        final += _NEG * np.float32(not self._improvable)
        final += (~just_finished).astype(np.float32) * _NEG
        merged_scores = np.concatenate([self._finished_scores, final.astype(np.float32)])
        merged_done = np.concatenate([self._is_finished, just_finished])
        merged = self._finished + [dataclasses.replace(h, score=s) for h, s in zip(extended, final)]
        best = _top(merged_scores, k)
        self._finished = [merged[c] for c in best]
        self._finished_scores = merged_scores[best]
        self._is_finished = merged_done[best]

        # Can the search go on? transformers' three conditions.
        length_norm = np.float32((cur + 1) ** self.length_penalty)
        best_possible = self.running[0].score / length_norm
        worst_finished = np.where(self._is_finished, self._finished_scores.min(), _NEG)
        self._improvable = self._improvable and bool(np.any(best_possible > worst_finished))
        all_finished = bool(self._is_finished.all()) and self.early_stopping
        self.done = not (self._improvable and not all_finished and not ends.all())
        return parents


def _top(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the n largest scores, largest first (ties: the earlier first)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:n]
