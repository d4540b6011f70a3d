"""One generation request, and the one validator of what a server can take (`Limits`).

In a module of its own, importing neither JAX nor Ray, so that the serving app's CPU deployments
(ingress, batcher) build, check and pass requests without loading the engine (app.protocol).

Where a limit is checked. `Limits` comes from the engine (`Engine.limits`: vocabulary, prompt
buckets, context, the KV pool's size) and checks a request against it: the ingress calls `check_prompt` before anything
is sent (so an HTTP client gets a 400 naming its field), and the driver calls `check` on every
submit (so the CLI, handle callers and anything that bypasses the ingress get the same answers).
Field types and ranges of the public API are the schemas' job (app.schemas); server policy such as
`max_tokens_limit` is the app's. A new engine limit goes here, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Sequence

from model.engine.buckets import smallest_fitting

FLOAT32_MAX = 3.4028234663852886e38  # sampling settings travel to the device as float32
INT32_LIMIT = 2**31  # the engine holds top_k and seeds as int32
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (the engine's per-row width)
MAX_STOP_TOKEN_IDS = 15  # stop token ids per request: with EOS, what min_tokens holds back on the device
MAX_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]


@dataclasses.dataclass(frozen=True)
class Request:
    """A tokenised prompt and its settings. Frozen: the driver never writes into a caller's request."""

    prompt_ids: Sequence[int]
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = a fresh random seed
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()  # stop strings, matched on the detokenised text
    stop_at_eos: bool = False
    min_tokens: int = 0  # EOS cannot end the request before this many tokens (transformers' min_new_tokens)
    num_beams: int = 1  # > 1: beam search by transformers' rules (greedy only; no stop strings or stop tokens)
    length_penalty: float = 1.0  # beam search: a finished beam scores sum(logprobs) / generated_len ** this
    early_stopping: bool = True  # beam search: stop once num_beams beams have finished
    # Logit adjustments, applied on the device before sampling (model.engine.penalties); logprobs stay the model's.
    presence_penalty: float = 0.0  # OpenAI's: -p for every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: -f x times each token was generated so far
    repetition_penalty: float = 1.0  # transformers': tokens of prompt and output divided (positive) / multiplied by it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, added to the logits
    # Scores reported beside the tokens.
    top_logprobs: int = 0  # the most likely alternatives reported per generated token
    prompt_logprobs: int | None = None  # score the prompt: each token's logprob and this many alternatives
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)


class RequestRejected(ValueError):
    """A request that cannot be served as asked (too long, bad settings); never truncated silently.
    `param` names the request field at fault, where there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Limits:
    """What an engine can take: the checks every layer shares."""

    vocab_size: int  # valid prompt token ids are [0, vocab_size) (the real vocabulary, no padding rows)
    prompt_buckets: tuple[int, ...]  # compiled prompt lengths; the longest prompt is the last
    max_total_length: int  # prompt + max_tokens must fit in this many positions
    kv_capacity_tokens: int | None = None  # the whole KV page pool; a longer sequence could never run
    max_beams: int = 1  # the most beams a request may search with
    kv_page_size: int = 1  # tokens per KV page (how many pages a beam request's divergent beams can take)
    max_top_logprobs: int = 5  # the most alternatives reported per token (top_logprobs, prompt_logprobs)

    @property
    def max_prompt_length(self) -> int:
        return self.prompt_buckets[-1]

    def prompt_bucket(self, length: int, param: str = "prompt") -> int:
        """The prompt bucket a prompt of `length` tokens is padded to."""
        bucket = smallest_fitting(length, self.prompt_buckets)
        if bucket is None:
            raise RequestRejected(
                f"{param} has {length} tokens; the longest prompt served is {self.max_prompt_length}", param
            )
        return bucket

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int, param: str = "prompt",
                     max_tokens_param: str = "max_tokens") -> None:
        """A prompt's token ids and length, and prompt + max_tokens against the context. `param` and
        `max_tokens_param` are the fields' names as the caller's API spells them."""
        if len(prompt_ids) == 0:
            raise RequestRejected(f"{param} is empty", param)
        bad = next((t for t in prompt_ids if not (_is_int(t) and 0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise RequestRejected(f"{param}: token id {bad!r} is outside the vocabulary [0, {self.vocab_size})", param)
        self.prompt_bucket(len(prompt_ids), param)
        total = len(prompt_ids) + max_tokens
        if total > self.max_total_length:
            raise RequestRejected(
                f"{param} ({len(prompt_ids)} tokens) + {max_tokens_param} ({max_tokens}) = {total} exceeds the "
                f"context limit of {self.max_total_length} tokens",
                max_tokens_param.split(".")[0],
            )
        if self.kv_capacity_tokens is not None and total > self.kv_capacity_tokens:
            raise RequestRejected(
                f"{param} ({len(prompt_ids)} tokens) + {max_tokens_param} ({max_tokens}) = {total} tokens can never "
                f"fit the KV cache, which holds {self.kv_capacity_tokens} tokens in all",
                max_tokens_param.split(".")[0],
            )

    def check(self, r: Request) -> None:
        """Everything about `r`: raises RequestRejected naming the problem; a request that passes can be
        served as asked."""
        scoring = r.prompt_logprobs is not None  # then max_tokens 0 scores the prompt only
        if not _is_int(r.max_tokens) or r.max_tokens < (0 if scoring else 1):
            what = "a non-negative integer when the prompt is scored" if scoring else "a positive integer"
            raise RequestRejected(f"max_tokens must be {what}, got {r.max_tokens!r}", "max_tokens")
        self.check_prompt(r.prompt_ids, r.max_tokens)
        if not r.temperature >= 0:  # also catches NaN
            raise RequestRejected(f"temperature must be >= 0, got {r.temperature}", "temperature")
        if r.temperature > FLOAT32_MAX:  # inf in float32: the sampler would divide the logits into NaNs
            raise RequestRejected(
                f"temperature must be at most {FLOAT32_MAX:.3g} (float32), got {r.temperature}", "temperature"
            )
        if not 0 < r.top_p <= 1:
            raise RequestRejected(f"top_p must be in (0, 1], got {r.top_p}", "top_p")
        if not 0 <= r.top_k < INT32_LIMIT:
            raise RequestRejected(f"top_k must be in [0, 2**31), got {r.top_k}", "top_k")
        if r.seed is not None and not 0 <= r.seed < INT32_LIMIT:
            raise RequestRejected(f"seed must be in [0, 2**31), got {r.seed}", "seed")
        if not _is_int(r.min_tokens) or not 0 <= r.min_tokens <= r.max_tokens:
            raise RequestRejected(f"min_tokens must be an integer in [0, max_tokens={r.max_tokens}], got "
                                  f"{r.min_tokens!r}", "min_tokens")
        self.check_logits(r)
        self.check_beams(r)

    def check_logits(self, r: Request) -> None:
        """Penalties, logit bias, stop token ids and the scores asked for."""
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(r, field)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:  # also catches NaN
                raise RequestRejected(f"{field} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}", field)
        if not 0 < r.repetition_penalty <= FLOAT32_MAX:
            raise RequestRejected(f"repetition_penalty must be a positive finite number, got {r.repetition_penalty}",
                                  "repetition_penalty")
        if len(r.logit_bias) > MAX_LOGIT_BIAS:
            raise RequestRejected(f"logit_bias has {len(r.logit_bias)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
        for token, bias in r.logit_bias:
            if not (_is_int(token) and 0 <= token < self.vocab_size):
                raise RequestRejected(f"logit_bias: token id {token!r} is outside the vocabulary [0, "
                                      f"{self.vocab_size})", "logit_bias")
            if not -MAX_BIAS <= bias <= MAX_BIAS:
                raise RequestRejected(f"logit_bias: the bias of token {token} must be in [-{MAX_BIAS:g}, "
                                      f"{MAX_BIAS:g}], got {bias}", "logit_bias")
        if len({t for t, _ in r.logit_bias}) != len(r.logit_bias):
            raise RequestRejected("logit_bias names a token id twice", "logit_bias")
        if len(r.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestRejected(f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(r.stop_token_ids)}",
                                  "stop_token_ids")
        for field in ("top_logprobs", "prompt_logprobs"):
            value = getattr(r, field)
            if value is not None and not (_is_int(value) and 0 <= value <= self.max_top_logprobs):
                raise RequestRejected(f"{field} must be an integer in [0, {self.max_top_logprobs}], got {value!r}",
                                      field)
        if r.num_beams > 1:  # beams extend the model's own top candidates, and report only their tokens' logprobs
            adjusted = (r.presence_penalty != 0 or r.frequency_penalty != 0 or r.repetition_penalty != 1
                        or r.logit_bias)
            if adjusted:
                raise RequestRejected("penalties and logit_bias are not supported with beam search (num_beams="
                                      f"{r.num_beams})", "num_beams")
            if r.top_logprobs or r.prompt_logprobs is not None:
                raise RequestRejected(f"top and prompt logprobs are not reported with beam search (num_beams="
                                      f"{r.num_beams})", "top_logprobs" if r.top_logprobs else "prompt_logprobs")

    def check_beams(self, r: Request) -> None:
        """Beam search settings: up to `max_beams` beams, greedy, ended by EOS and max_tokens only."""
        if not _is_int(r.num_beams) or not 1 <= r.num_beams <= self.max_beams:
            raise RequestRejected(f"num_beams must be an integer in [1, {self.max_beams}], got {r.num_beams!r}",
                                  "num_beams")
        if not abs(r.length_penalty) <= FLOAT32_MAX:  # also catches NaN
            raise RequestRejected(f"length_penalty must be a finite number, got {r.length_penalty}", "length_penalty")
        if r.num_beams == 1:
            return
        if self.kv_capacity_tokens is not None:
            page, prompt = self.kv_page_size, len(r.prompt_ids)
            shared = prompt // page  # the prompt's full pages, which every beam shares
            pages = shared + r.num_beams * (-(-(prompt + r.max_tokens) // page) - shared)
            if pages * page > self.kv_capacity_tokens:
                raise RequestRejected(
                    f"{r.num_beams} beams of prompt ({prompt} tokens) + max_tokens ({r.max_tokens}) can take "
                    f"{pages * page} tokens of KV pages; the KV cache holds {self.kv_capacity_tokens} in all",
                    "max_tokens")
        for field, bad in (("temperature", r.temperature != 0), ("stop", bool(r.stop)),
                           ("stop_token_ids", bool(r.stop_token_ids))):
            if bad:
                raise RequestRejected(f"{field} is not supported with beam search (num_beams={r.num_beams}): beams "
                                      "are greedy and end at EOS or max_tokens", field)


def _is_int(x) -> bool:
    """An integer, Python's or numpy's (without importing numpy)."""
    return isinstance(x, int) or (type(x).__module__ == "numpy" and hasattr(x, "__index__"))
