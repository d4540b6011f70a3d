"""Output processing: from a request's sampled tokens to what its caller receives.

One `OutputStream` per request turns each token the engine sampled into an `Output`:
- a stop token (the request's `stop_token_ids`, and EOS when `stop_at_eos`) ends the request and is
  not returned;
- text is detokenised incrementally (never half a UTF-8 character, model.text.tokenizer);
- stop strings are matched on the text; text that could still be the start of a stop string is held
  back, so a stop string never reaches the caller, and the text is cut where the first one begins;
- `max_tokens` ends the request with reason "length" (0: right after the prefill, no token returned,
  for a request that only scores its prompt);
- before `min_tokens` tokens, stop strings do not end the request (vLLM's rule; stop tokens and EOS
  cannot be sampled then: the engine holds them back);
- a request's prompt scores (`prompt_logprobs`, from its prefill) go out with its first Output.
Deciding that a request has ended is this module's job (vLLM keeps stop-string matching beside
detokenisation too); freeing what it held is the scheduler's, which the driver tells.
"""

from __future__ import annotations

import dataclasses

from model.serving.request import Request
from model.text.tokenizer import Tokenizer


@dataclasses.dataclass
class Beam:
    """One finished beam of a beam search: its tokens (EOS included when it ended on it), their own
    logprobs, its text and its score (transformers' `sequences_scores`: sum of logprobs / length ** penalty)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    score: float


@dataclasses.dataclass
class Output:
    request_id: str
    token_ids: list[int]  # new since the previous Output of this request
    logprobs: list[float]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    score: float | None = None  # beam search: the best beam's score (its tokens are `token_ids`)
    beams: list[Beam] | None = None  # beam search: every finished beam, best first
    top_logprobs: list[dict[int, float]] | None = None  # per token: its `top_logprobs` most likely, best first
    # The first Output of a request with `prompt_logprobs`: per prompt token (the first has none: None),
    # its logprob and the request's `prompt_logprobs` most likely tokens at its position, best first.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclasses.dataclass
class Result:
    """A whole generation, as `Driver.generate` returns it."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    score: float | None = None  # beam search (see Output)
    beams: list[Beam] | None = None
    prompt_logprobs: list[float | None] | None = None  # see Output
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    top_logprobs: list[dict[int, float]] | None = None  # per token, when the request asked for top_logprobs

    @staticmethod
    def of(request: Request, outputs: list[Output]) -> "Result":
        return Result(
            request_id=request.request_id,
            prompt_ids=list(request.prompt_ids),
            token_ids=[t for o in outputs for t in o.token_ids],
            logprobs=[lp for o in outputs for lp in o.logprobs],
            text="".join(o.text for o in outputs),
            finish_reason=outputs[-1].finish_reason,
            score=outputs[-1].score,
            beams=outputs[-1].beams,
            prompt_logprobs=outputs[0].prompt_logprobs,
            prompt_top_logprobs=outputs[0].prompt_top_logprobs,
            top_logprobs=[t for o in outputs for t in o.top_logprobs or ()] if request.top_logprobs else None,
        )


class OutputStream:
    """One request's tokens -> Outputs (see the module docstring)."""

    def __init__(self, request: Request, tokenizer: Tokenizer, eos_token_id: int):
        self.request = request
        self._detok = tokenizer.detokenizer()
        self._stop_ids = frozenset(request.stop_token_ids) | ({eos_token_id} if request.stop_at_eos else set())
        self._longest_stop = max((len(s) for s in request.stop), default=0)
        self._text = ""  # all text so far (complete characters)
        self._sent = 0  # how much of it has been delivered
        self.n_tokens = 0
        self._prompt_scores: tuple[list, list] | None = None  # to go out with the next Output

    def score_prompt(self, logprobs: list[float | None], top: list[dict[int, float] | None]) -> None:
        """The prompt's scores (see Output), delivered with the next Output."""
        self._prompt_scores = (logprobs, top)

    def accept(self, token: int, logprob: float, top: dict[int, float] | None = None) -> Output:
        """The request's next sampled token (and the most likely tokens there, when the request asks
        for `top_logprobs`); the Output is `finished` when it ended the request."""
        if self.request.max_tokens == 0:  # the prompt is scored: nothing to generate
            return self.end("length")
        if token in self._stop_ids:
            return self.end("stop")
        self.n_tokens += 1
        before = len(self._text)
        self._text += self._detok.push(token)
        reason = None
        if self._longest_stop and self.n_tokens >= self.request.min_tokens:
            # A new match must end in text added by this token (one inside older text, not matched
            # before min_tokens, never ends the request later).
            hits = [i for i in (self._text.find(s, max(0, before - len(s) + 1)) for s in self.request.stop) if i >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                reason = "stop"
        if reason is None and self.n_tokens >= self.request.max_tokens:
            self._text += self._detok.flush()
            reason = "length"
        if reason is not None:
            out = self.end(reason, [token], [logprob])
        else:
            out = self._output([token], [logprob], max(self._sent, len(self._text) - max(self._longest_stop - 1, 0)))
        if top is not None:
            out.top_logprobs = [top]
        return out

    def end(self, reason: str, token_ids=(), logprobs=(), error: str | None = None) -> Output:
        """The last Output: the rest of the text, with `reason` ("cancelled", "error" when ended from outside)."""
        return self._output(list(token_ids), list(logprobs), len(self._text), reason, error)

    def _output(self, token_ids, logprobs, upto: int, reason: str | None = None, error: str | None = None) -> Output:
        text, self._sent = self._text[self._sent : upto], upto
        out = Output(self.request.request_id, token_ids, logprobs, text, reason is not None, reason, error)
        if self._prompt_scores is not None:
            out.prompt_logprobs, out.prompt_top_logprobs = self._prompt_scores
            self._prompt_scores = None
        return out
