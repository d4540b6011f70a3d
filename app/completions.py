"""From an API request to engine requests, and from chunks back to API responses. No Ray here.

`plan_completion` tokenises and validates an OpenAI request against the replica's limits (`ModelInfo`)
and expands it into one `EngineRequest` per choice: prompt i, sample j becomes choice i * n + j, as in
OpenAI's API. Every rejection is an `InvalidRequest` naming the field, raised before anything is sent
to the batcher. `CompletionAssembler` folds the chunks of all choices into stream events and into the
final response (text, logprobs, finish reasons, usage).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from app.protocol import Chunk, EngineRequest, InvalidRequest, ModelInfo
from app.schemas import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    SaxmlGenerateRequest,
    Usage,
)
from model.text.tokenizer import Tokenizer


def check_prompt(
    prompt_ids: list[int], max_tokens: int, info: ModelInfo, param: str = "prompt", max_tokens_param: str = "max_tokens"
) -> None:
    """The limits the engine enforces, checked up front with messages that name the field."""
    bad = next((t for t in prompt_ids if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"{param}: token id {bad} is outside the vocabulary [0, {info.vocab_size})", param)
    longest = info.prompt_buckets[-1]
    if len(prompt_ids) > longest:
        raise InvalidRequest(f"{param} has {len(prompt_ids)} tokens; the longest prompt served is {longest}", param)
    total = len(prompt_ids) + max_tokens
    if total > info.max_total_length:
        raise InvalidRequest(
            f"{param} ({len(prompt_ids)} tokens) + {max_tokens_param} ({max_tokens}) = {total} exceeds the context "
            f"limit of {info.max_total_length} tokens",
            max_tokens_param.split(".")[0],
        )


def check_max_tokens(max_tokens: int, limit: int | None, param: str = "max_tokens") -> None:
    """The server's own cap on max_tokens (AppArgs.max_tokens_limit), if it has one."""
    if limit is not None and max_tokens > limit:
        raise InvalidRequest(
            f"{param}={max_tokens} exceeds this server's max_tokens_limit={limit}", param.split(".")[0]
        )


def tokenize_prompts(request: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif isinstance(prompt[0], str):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if any(not p for p in prompts):  # text that encodes to no tokens
        raise InvalidRequest("prompt encodes to no tokens", "prompt")
    return prompts


@dataclasses.dataclass
class CompletionPlan:
    prompts: list[list[int]]  # per prompt
    requests: list[EngineRequest]  # per choice, in choice order


def plan_completion(
    request: CompletionRequest, info: ModelInfo, tokenizer: Tokenizer, default_max_tokens: int, max_n: int,
    max_choices: int, max_tokens_limit: int | None = None,
) -> CompletionPlan:
    """`max_choices` bounds prompts x n: more could never be admitted at once (max_pending_requests).
    `max_tokens_limit`, if set, bounds max_tokens below what the context allows."""
    if not 1 <= request.n <= max_n:
        raise InvalidRequest(f"n must be in [1, {max_n}], got {request.n}", "n")
    max_tokens = request.max_tokens or default_max_tokens
    check_max_tokens(max_tokens, max_tokens_limit)
    prompts = tokenize_prompts(request, tokenizer)
    if len(prompts) * request.n > max_choices:
        raise InvalidRequest(
            f"{len(prompts)} prompts x n={request.n} = {len(prompts) * request.n} completions; at most "
            f"{max_choices} per request", "n" if request.n > 1 else "prompt",
        )
    for ids in prompts:
        check_prompt(ids, max_tokens, info)
    requests = [
        EngineRequest(
            request_id=uuid.uuid4().hex,
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=None if request.seed is None else (request.seed + j) % 2**31,  # the engine's are int32
            stop=request.stop_list,
            stop_at_eos=not request.ignore_eos,
        )
        for ids in prompts
        for j in range(request.n)
    ]
    return CompletionPlan(prompts, requests)


def plan_saxml(
    request: SaxmlGenerateRequest, info: ModelInfo, tokenizer: Tokenizer, default_max_tokens: int,
    max_tokens_limit: int | None = None,
) -> EngineRequest:
    extra = request.extra_inputs
    max_tokens = extra.per_example_max_decode_steps or default_max_tokens
    check_max_tokens(max_tokens, max_tokens_limit, "extra_inputs.per_example_max_decode_steps")
    ids = tokenizer.encode(request.query)
    if not ids:
        raise InvalidRequest("query encodes to no tokens", "query")
    check_prompt(ids, max_tokens, info, "query", "extra_inputs.per_example_max_decode_steps")
    return EngineRequest(
        request_id=uuid.uuid4().hex, prompt_ids=ids, max_tokens=max_tokens, temperature=extra.temperature,
        top_k=extra.per_example_top_k, top_p=extra.per_example_top_p, stop_at_eos=True,
    )


@dataclasses.dataclass
class _Choice:
    prompt_ids: list[int]
    text: str = ""  # everything this choice returned so far, echoed prompt included
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False  # a chunk arrived (the echoed prompt goes out with the first)


class CompletionAssembler:
    """Builds stream events and the final response for one request from its choices' chunks."""

    def __init__(self, request: CompletionRequest, plan: CompletionPlan, model: str, tokenizer: Tokenizer):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self._request = request
        self._tokenizer = tokenizer
        n = request.n
        self._choices = [_Choice(plan.prompts[i // n]) for i in range(len(plan.requests))]
        self._index = {r.request_id: i for i, r in enumerate(plan.requests)}

    def add(self, chunk: Chunk) -> CompletionChunk:
        """Fold in one chunk; returns the stream event that carries it."""
        index = self._index[chunk.request_id]
        choice = self._choices[index]
        prefix = self._tokenizer.decode(choice.prompt_ids) if self._request.echo and not choice.started else ""
        choice.started = True
        start = len(choice.text)  # logprobs never come with echo, so no prefix to skip
        choice.text += prefix + chunk.text
        choice.token_ids += chunk.token_ids
        choice.logprobs += chunk.logprobs
        choice.finish_reason = chunk.finish_reason
        event = CompletionChoice(
            index=index, text=prefix + chunk.text, finish_reason=chunk.finish_reason,
            logprobs=self._logprobs(chunk.token_ids, chunk.logprobs, start),
            token_ids=chunk.token_ids if self._request.return_token_ids else None,
        )
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[event])

    def usage(self) -> Usage:
        prompt = sum(len(c.prompt_ids) for c in self._choices[:: self._request.n])  # once per prompt
        completion = sum(len(c.token_ids) for c in self._choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def usage_event(self) -> CompletionChunk:
        """OpenAI's last stream event when stream_options.include_usage: no choices, just usage."""
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())

    def response(self) -> CompletionResponse:
        choices = []
        for index, c in enumerate(self._choices):
            choices.append(CompletionChoice(
                index=index, text=c.text, finish_reason=c.finish_reason,
                logprobs=self._logprobs(c.token_ids, c.logprobs, 0),
                prompt_token_ids=c.prompt_ids if self._request.return_token_ids else None,
                token_ids=c.token_ids if self._request.return_token_ids else None,
            ))
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )

    def _logprobs(self, token_ids: list[int], logprobs: list[float], start: int) -> Logprobs | None:
        """Chosen-token logprobs, each token's text and its offset in the choice's text."""
        if self._request.logprobs is None:
            return None
        tokens = [self._tokenizer.decode([t]) for t in token_ids]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return Logprobs(tokens=tokens, token_logprobs=logprobs, text_offset=offsets)
