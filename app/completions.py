"""From an API request to engine requests, and from chunks back to API responses. No Ray here.

`plan_completion` tokenises an OpenAI request, checks it against the engine's limits
(`model.serving.request.Limits`, from the replica) and the server's own policy (`ServerPolicy`, from
the app's args), and expands it into one `Request` per choice: prompt i, sample j becomes choice
i * n + j, as in OpenAI's API. Every rejection is an `InvalidRequest` naming the field, raised before
anything is sent to the batcher. `CompletionAssembler` folds the chunks of all choices into stream
events and into the final response (text, logprobs, finish reasons, usage).

Where a check lives: field types and ranges in app.schemas; engine limits (token ids, prompt length,
context) in `Limits`, the one validator the driver also runs; server policy (n, prompts and choices
per request, max_tokens_limit, the body limit) here, in `ServerPolicy`.

Cheap refusals first. Everything that can be checked without tokenising is checked before: n, the
number of prompts and of choices, and the size of every text prompt. A byte-level BPE token stands for
at most `longest_token_bytes(tokenizer)` bytes (128 for GPT-2), so a text of more UTF-8 bytes than the
longest prompt served times that can never be a valid prompt; it is refused unread, and the tokenizer
never sees more text than the largest valid prompt can have.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from app.args import AppArgs
from app.protocol import Chunk, InvalidRequest
from app.schemas import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    SaxmlGenerateRequest,
    Usage,
    prompt_list,
)
from model.serving.request import Limits, Request, RequestRejected
from model.text.tokenizer import Tokenizer

SAXML_STEPS = "extra_inputs.per_example_max_decode_steps"  # Saxml's max_tokens, as its API spells it
# The engine's request fields (RequestRejected.param) as Saxml's /generate spells them.
SAXML_FIELDS = {"max_tokens": SAXML_STEPS, "min_tokens": "extra_inputs.per_example_min_decode_steps",
                "num_beams": "extra_inputs.beam_size", "temperature": "extra_inputs.temperature",
                "top_k": "extra_inputs.per_example_top_k", "top_p": "extra_inputs.per_example_top_p",
                "length_penalty": "extra_inputs.length_penalty"}
# The default body limit (default_request_bytes): JSON bytes a prompt token may take (a token id takes
# at most 7, "50256, "; English text about 4-5; CJK text escaped as \uXXXX up to 12), the other fields
# with room to spare, and the worst JSON escaping of a character (\u0000) for the stop strings.
PROMPT_JSON_BYTES_PER_TOKEN = 16
OTHER_FIELDS_JSON_BYTES = 4096
JSON_ESCAPE_BYTES = 6


def default_request_bytes(args: AppArgs) -> int:
    """The body limit when `args.max_request_bytes` is unset: what the largest valid request can use
    (`max_prompts` prompts of the longest bucket, the stop strings, the other fields)."""
    prompts = args.max_prompts * max(args.prompt_buckets) * PROMPT_JSON_BYTES_PER_TOKEN
    return OTHER_FIELDS_JSON_BYTES + MAX_STOPS * MAX_STOP_CHARS * JSON_ESCAPE_BYTES + prompts


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most bytes of text one token stands for (128 for GPT-2's vocabulary)."""
    return max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))


@dataclasses.dataclass(frozen=True)
class ServerPolicy:
    """What this server allows a request beyond the engine's limits (built once from the app's args)."""

    default_max_tokens: int  # max_tokens when a request leaves it unset
    max_n: int  # the largest `n`
    max_choices: int  # prompts x n per request: more could never be admitted at once (max_pending_requests)
    max_tokens_limit: int | None = None  # if set, bounds max_tokens below what the context allows
    max_prompts: int = 8  # prompts per request
    max_request_bytes: int = 1 << 20  # bodies beyond get 413
    token_bytes: int = 128  # the most bytes of text one token stands for (longest_token_bytes)
    saxml_tokenized: bool = False  # /generate takes and answers comma-separated token ids (AppArgs.saxml_tokenized)

    @classmethod
    def from_args(cls, args: AppArgs, tokenizer: Tokenizer) -> ServerPolicy:
        return cls(default_max_tokens=args.default_max_tokens, max_n=args.max_n,
                   max_choices=args.max_pending_requests, max_tokens_limit=args.max_tokens_limit,
                   max_prompts=args.max_prompts,
                   max_request_bytes=args.max_request_bytes or default_request_bytes(args),
                   token_bytes=longest_token_bytes(tokenizer), saxml_tokenized=args.saxml_tokenized)

    def check_text_size(self, text: str, limits: Limits, param: str) -> None:
        """Refuse, before tokenising, a text too long to be a prompt the engine serves."""
        most = limits.max_prompt_length * self.token_bytes
        size = len(text.encode("utf-8"))
        if size > most:
            raise InvalidRequest(
                f"{param} is {size} bytes of text; the longest prompt served is {limits.max_prompt_length} tokens, "
                f"which is at most {most} bytes", param.split(".")[0],
            )


def check_prompt(
    prompt_ids: list[int], max_tokens: int, limits: Limits, param: str = "prompt", max_tokens_param: str = "max_tokens"
) -> None:
    """The engine's limits (`Limits.check_prompt`, the one validator), as an InvalidRequest naming the field."""
    try:
        limits.check_prompt(prompt_ids, max_tokens, param, max_tokens_param)
    except RequestRejected as e:
        raise InvalidRequest(str(e), e.param) from None


def check_max_tokens(max_tokens: int, limit: int | None, param: str = "max_tokens") -> None:
    """The server's own cap on max_tokens (AppArgs.max_tokens_limit), if it has one."""
    if limit is not None and max_tokens > limit:
        raise InvalidRequest(
            f"{param}={max_tokens} exceeds this server's max_tokens_limit={limit}", param.split(".")[0]
        )


def tokenize_prompts(prompts: list[str] | list[list[int]], tokenizer: Tokenizer) -> list[list[int]]:
    """Every prompt as token ids (text is encoded, token ids are taken as they are)."""
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if any(not p for p in prompts):  # text that encodes to no tokens
        raise InvalidRequest("prompt encodes to no tokens", "prompt")
    return prompts


@dataclasses.dataclass
class CompletionPlan:
    prompts: list[list[int]]  # per prompt
    requests: list[Request]  # per choice, in choice order


def plan_completion(
    request: CompletionRequest, tokenizer: Tokenizer, limits: Limits, policy: ServerPolicy
) -> CompletionPlan:
    """The engine requests of an OpenAI completion request, one per choice, every check passed."""
    if not 1 <= request.n <= policy.max_n:
        raise InvalidRequest(f"n must be in [1, {policy.max_n}], got {request.n}", "n")
    max_tokens = request.max_tokens or policy.default_max_tokens
    check_max_tokens(max_tokens, policy.max_tokens_limit)
    given = prompt_list(request.prompt)
    if len(given) > policy.max_prompts:
        raise InvalidRequest(f"{len(given)} prompts; at most {policy.max_prompts} per request", "prompt")
    choices = len(given) * request.n
    if choices > policy.max_choices:
        raise InvalidRequest(
            f"{len(given)} prompts x n={request.n} = {choices} completions; at most "
            f"{policy.max_choices} per request", "n" if request.n > 1 else "prompt",
        )
    for p in given:  # token-id prompts need no tokenising; check_prompt below bounds them
        if isinstance(p, str):
            policy.check_text_size(p, limits, "prompt")
    prompts = tokenize_prompts(given, tokenizer)
    for ids in prompts:
        check_prompt(ids, max_tokens, limits)
    requests = [
        Request(
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


def plan_saxml(request: SaxmlGenerateRequest, tokenizer: Tokenizer, limits: Limits, policy: ServerPolicy) -> Request:
    """The one engine request of a Saxml /generate request, every check passed. With
    `policy.saxml_tokenized`, the query is comma-separated token ids (Saxml's TOKENIZED_INPUT)."""
    extra = request.extra_inputs
    max_tokens = extra.per_example_max_decode_steps or policy.default_max_tokens
    check_max_tokens(max_tokens, policy.max_tokens_limit, SAXML_STEPS)
    if policy.saxml_tokenized:
        ids = parse_token_ids(request.query)
    else:
        policy.check_text_size(request.query, limits, "query")
        ids = tokenizer.encode(request.query)
    if not ids:
        raise InvalidRequest("query encodes to no tokens", "query")
    check_prompt(ids, max_tokens, limits, "query", SAXML_STEPS)
    if extra.beam_size > policy.max_choices:  # the batcher could never admit its beams
        raise InvalidRequest(f"extra_inputs.beam_size={extra.beam_size} exceeds the sequences this server holds at "
                             f"once (max_pending_requests={policy.max_choices})", "extra_inputs")
    engine_request = Request(
        request_id=uuid.uuid4().hex, prompt_ids=ids, max_tokens=max_tokens, temperature=extra.temperature,
        top_k=extra.per_example_top_k, top_p=extra.per_example_top_p, stop_at_eos=True,
        min_tokens=extra.per_example_min_decode_steps, num_beams=extra.beam_size, length_penalty=extra.length_penalty,
    )
    try:
        limits.check(engine_request)
    except RequestRejected as e:  # the field named as Saxml's API spells it
        field = SAXML_FIELDS.get(e.param, e.param or "extra_inputs")
        raise InvalidRequest(f"{field}: {e}", field.split(".")[0]) from None
    return engine_request


def parse_token_ids(query: str) -> list[int]:
    """A tokenized Saxml query, "17,42,9": its token ids (their range is Limits.check_prompt's to check)."""
    try:
        return [int(t) for t in query.split(",")]
    except ValueError:
        raise InvalidRequest(f"query must be comma-separated token ids (saxml_tokenized), got {query[:40]!r}",
                             "query") from None


def saxml_answer(chunks: list[Chunk], tokenized: bool) -> list[tuple[str, float]]:
    """Saxml's `generate_response` from one request's chunks: [(text, sum of logprobs)], or with beam
    search every finished beam (text, score), best first; with `tokenized`, token ids comma-separated
    instead of text (Saxml's TOKENIZED_OUTPUT)."""
    def rendered(text: str, token_ids: list[int]) -> str:
        return ",".join(map(str, token_ids)) if tokenized else text

    last = chunks[-1]
    if last.beams is not None:
        return [(rendered(b.text, b.token_ids), b.score) for b in last.beams]
    token_ids = [t for c in chunks for t in c.token_ids]
    score = sum(lp for c in chunks for lp in c.logprobs)
    return [(rendered("".join(c.text for c in chunks), token_ids), score)]


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
