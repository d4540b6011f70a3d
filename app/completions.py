"""From an API request to engine requests, and from chunks back to API responses. No Ray here.

`plan_completion` tokenises an OpenAI request, checks it against the engine's limits
(`model.serving.request.Limits`, from the replica) and the server's own policy (`ServerPolicy`, from
the app's args), and expands it into one `Request` per candidate: `n` per prompt, or `best_of`; prompt
i, sample j becomes choice i * n + j, as in OpenAI's API. Every rejection is an `InvalidRequest`
naming the field, raised before anything is sent to the batcher. `CompletionAssembler` folds the
chunks of all candidates into stream events and into the final response (text, logprobs with the
echoed prompt's scores and top alternatives, finish reasons, usage), choosing the `n` best of
`best_of` candidates by cumulative logprob.

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
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    SaxmlGenerateRequest,
    Usage,
    prompt_list,
)
from model.serving.output import Beam
from model.serving.request import MAX_LOGIT_BIAS, Limits, Request, RequestRejected
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
LOGIT_BIAS_JSON_BYTES = 32  # one logit_bias entry: "50256": -100.0 and change


def default_request_bytes(args: AppArgs) -> int:
    """The body limit when `args.max_request_bytes` is unset: what the largest valid request can use
    (`max_prompts` prompts of the longest bucket, the stop strings, a full logit_bias, the other fields)."""
    prompts = args.max_prompts * max(args.prompt_buckets) * PROMPT_JSON_BYTES_PER_TOKEN
    bias = MAX_LOGIT_BIAS * LOGIT_BIAS_JSON_BYTES
    return OTHER_FIELDS_JSON_BYTES + args.max_stops * MAX_STOP_CHARS * JSON_ESCAPE_BYTES + bias + prompts


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
    max_stops: int = 16  # stop sequences per request
    max_request_bytes: int = 1 << 20  # bodies beyond get 413
    token_bytes: int = 128  # the most bytes of text one token stands for (longest_token_bytes)
    saxml_tokenized: bool = False  # /generate takes and answers comma-separated token ids (AppArgs.saxml_tokenized)

    @classmethod
    def from_args(cls, args: AppArgs, tokenizer: Tokenizer) -> ServerPolicy:
        return cls(default_max_tokens=args.default_max_tokens, max_n=args.max_n,
                   max_choices=args.max_pending_requests, max_tokens_limit=args.max_tokens_limit,
                   max_prompts=args.max_prompts, max_stops=args.max_stops,
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


def check_request(request: Request, limits: Limits) -> None:
    """Everything the engine's one validator checks (`Limits.check`), as an InvalidRequest naming the field."""
    try:
        limits.check(request)
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
    requests: list[Request]  # per candidate: prompt i's c-th is requests[i * candidates + c]
    candidates: int  # engine requests per prompt: n, best_of, or 1 (one beam search)


def plan_completion(
    request: CompletionRequest, tokenizer: Tokenizer, limits: Limits, policy: ServerPolicy
) -> CompletionPlan:
    """The engine requests of an OpenAI completion request, one per candidate, every check passed."""
    n, best_of = request.n, request.best_of or request.n
    if not 1 <= n <= policy.max_n:
        raise InvalidRequest(f"n must be in [1, {policy.max_n}], got {n}", "n")
    if not n <= best_of <= policy.max_n:
        raise InvalidRequest(f"best_of must be in [n={n}, {policy.max_n}], got {best_of}", "best_of")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options can only be set when stream is true", "stream_options")
    if request.stream and (best_of > n or request.use_beam_search):
        raise InvalidRequest("best_of > n and use_beam_search cannot be streamed: the choices are known only "
                             "when every candidate has finished", "best_of" if best_of > n else "use_beam_search")
    max_tokens = policy.default_max_tokens if request.max_tokens is None else request.max_tokens
    if max_tokens == 0 and not request.echo:
        raise InvalidRequest("max_tokens may be 0 only with echo (the prompt is scored, nothing generated)",
                             "max_tokens")
    check_max_tokens(max_tokens, policy.max_tokens_limit)
    if request.logprobs is not None and request.logprobs > limits.max_top_logprobs:
        raise InvalidRequest(f"logprobs must be at most {limits.max_top_logprobs}, got {request.logprobs}", "logprobs")
    if len(request.stop_list) > policy.max_stops:
        raise InvalidRequest(f"at most {policy.max_stops} stop sequences, got {len(request.stop_list)}", "stop")
    temperature = request.temperature
    if request.use_beam_search:
        if "temperature" in request.model_fields_set and temperature != 0:
            raise InvalidRequest(f"use_beam_search is greedy: temperature must be 0, got {temperature}",
                                 "temperature")
        temperature = 0.0
    given = prompt_list(request.prompt)
    if len(given) > policy.max_prompts:
        raise InvalidRequest(f"{len(given)} prompts; at most {policy.max_prompts} per request", "prompt")
    choices = len(given) * best_of
    if choices > policy.max_choices:
        what = f"best_of={best_of}" if best_of > n else f"n={n}"
        raise InvalidRequest(
            f"{len(given)} prompts x {what} = {choices} completions; at most "
            f"{policy.max_choices} per request", ("best_of" if best_of > n else "n") if best_of > 1 else "prompt",
        )
    for p in given:  # token-id prompts need no tokenising; the checks below bound them
        if isinstance(p, str):
            policy.check_text_size(p, limits, "prompt")
    prompts = tokenize_prompts(given, tokenizer)
    for ids in prompts:
        check_prompt(ids, max_tokens, limits)
    scored = request.echo and (request.logprobs is not None or max_tokens == 0)
    candidates = 1 if request.use_beam_search else best_of
    requests = [
        Request(
            request_id=uuid.uuid4().hex,
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=max(request.top_k, 0),  # -1: off, as 0
            top_p=request.top_p,
            seed=None if request.seed is None else (request.seed + j) % 2**31,  # the engine's are int32
            stop=request.stop_list,
            stop_token_ids=tuple(request.stop_token_ids or ()),
            stop_at_eos=not request.ignore_eos,
            min_tokens=request.min_tokens,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logit_bias=tuple((int(token), bias) for token, bias in (request.logit_bias or {}).items()),
            top_logprobs=request.logprobs or 0,
            prompt_logprobs=(request.logprobs or 0) if scored else None,
            num_beams=best_of if request.use_beam_search else 1,
            length_penalty=request.length_penalty,
        )
        for ids in prompts
        for j in range(candidates)
    ]
    for r in requests[:: candidates]:  # the candidates of a prompt differ only in their seeds
        check_request(r, limits)
    return CompletionPlan(prompts, requests, candidates)


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
class _Candidate:
    """One engine request's output so far (a choice, or one of best_of candidates)."""

    prompt: int  # its prompt's index
    prompt_ids: list[int]
    text: str = ""  # everything generated so far (the echoed prompt not included)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float] | None] = dataclasses.field(default_factory=list)  # None: not reported
    prompt_logprobs: list[float | None] | None = None  # its prompt's scores (echo with logprobs)
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None
    started: bool = False  # a chunk arrived (the echoed prompt goes out with the first)
    beams: list[Beam] | None = None  # a beam search's finished beams, best first

    @property
    def cumulative_logprob(self) -> float:
        return sum(self.logprobs)


class CompletionAssembler:
    """Builds stream events and the final response for one request from its candidates' chunks."""

    def __init__(self, request: CompletionRequest, plan: CompletionPlan, model: str, tokenizer: Tokenizer):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self._request = request
        self._tokenizer = tokenizer
        self._per_prompt = plan.candidates
        self._candidates = [_Candidate(i // plan.candidates, plan.prompts[i // plan.candidates])
                            for i in range(len(plan.requests))]
        self._index = {r.request_id: i for i, r in enumerate(plan.requests)}
        self._prompt_text = [tokenizer.decode(p) if request.echo else "" for p in plan.prompts]

    def add(self, chunk: Chunk) -> CompletionChunk:
        """Fold in one chunk; returns the stream event that carries it (streams have one candidate per
        choice, so the candidate's index is its choice's)."""
        index = self._index[chunk.request_id]
        c = self._candidates[index]
        first = not c.started
        c.started = True
        if chunk.prompt_logprobs is not None:
            c.prompt_logprobs, c.prompt_top_logprobs = chunk.prompt_logprobs, chunk.prompt_top_logprobs
        start = len(c.text)
        c.text += chunk.text
        c.token_ids += chunk.token_ids
        c.logprobs += chunk.logprobs
        tops = chunk.top_logprobs if chunk.top_logprobs is not None else [None] * len(chunk.token_ids)
        c.top_logprobs += tops
        c.finish_reason = chunk.finish_reason
        c.beams = chunk.beams if chunk.beams is not None else c.beams
        echoed = self._prompt_text[c.prompt] if first else ""
        logprobs = None
        if self._request.logprobs is not None:
            logprobs = self._logprobs(c, chunk.token_ids, chunk.logprobs, tops, start, with_prompt=first)
        event = CompletionChoice(
            index=index, text=echoed + chunk.text, finish_reason=chunk.finish_reason, logprobs=logprobs,
            token_ids=chunk.token_ids if self._request.return_token_ids else None,
        )
        usage = self.usage() if self._continuous_usage else None
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[event], usage=usage)

    @property
    def _continuous_usage(self) -> bool:
        options = self._request.stream_options
        return bool(options and options.continuous_usage_stats)

    def usage(self) -> Usage:
        """Prompt tokens once per prompt; completion tokens of every candidate (best_of ones included),
        or of the beams returned."""
        prompt = sum(len(c.prompt_ids) for c in self._candidates[:: self._per_prompt])
        completion = sum(sum(len(self._beam_tokens(b)) for b in c.beams[: self._request.n]) if c.beams
                         else len(c.token_ids) for c in self._candidates)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def usage_event(self) -> CompletionChunk:
        """OpenAI's last stream event when stream_options.include_usage: no choices, just usage."""
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage())

    def response(self) -> CompletionResponse:
        """The whole response: each prompt's n choices, the n best of its best_of candidates by
        cumulative logprob (OpenAI's best_of), in choice order i * n + j."""
        n, choices = self._request.n, []
        for i in range(len(self._prompt_text)):
            group = self._candidates[i * self._per_prompt : (i + 1) * self._per_prompt]
            if group[0].beams:  # use_beam_search: the n best beams are the choices
                for beam in group[0].beams[:n]:
                    tokens = self._beam_tokens(beam)
                    choices.append(CompletionChoice(
                        index=len(choices), text=self._prompt_text[i] + beam.text,
                        finish_reason="stop" if len(tokens) < len(beam.token_ids) else "length",
                        prompt_token_ids=group[0].prompt_ids if self._request.return_token_ids else None,
                        token_ids=tokens if self._request.return_token_ids else None,
                    ))
                continue
            if len(group) > n:
                group = sorted(group, key=lambda c: c.cumulative_logprob, reverse=True)[:n]
            for c in group:
                logprobs = None
                if self._request.logprobs is not None:
                    logprobs = self._logprobs(c, c.token_ids, c.logprobs, c.top_logprobs, 0, with_prompt=True)
                choices.append(CompletionChoice(
                    index=len(choices), text=self._prompt_text[i] + c.text, finish_reason=c.finish_reason,
                    logprobs=logprobs, prompt_token_ids=c.prompt_ids if self._request.return_token_ids else None,
                    token_ids=c.token_ids if self._request.return_token_ids else None,
                ))
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )

    def _beam_tokens(self, beam: Beam) -> list[int]:
        """A beam's tokens without the EOS it ended on (a stop token is never returned)."""
        ended = beam.token_ids and beam.token_ids[-1] == self._tokenizer.eos_id
        return beam.token_ids[:-1] if ended else beam.token_ids

    def _logprobs(self, c: _Candidate, token_ids: list[int], logprobs: list[float],
                  tops: list[dict[int, float] | None], start: int, with_prompt: bool) -> Logprobs:
        """OpenAI's logprobs of `token_ids` (generated, from `start` in the candidate's text), after the
        echoed prompt's when `with_prompt` and echo: each token's text, logprob, offset in the
        choice's text, and its `logprobs` most likely alternatives with the token itself."""
        ids, scores, alternatives = list(token_ids), list(logprobs), list(tops)
        offset = start
        if with_prompt and self._request.echo:
            prompt = c.prompt_ids
            ids = prompt + ids
            scores = (c.prompt_logprobs or [None] * len(prompt)) + scores
            alternatives = (c.prompt_top_logprobs or [None] * len(prompt)) + alternatives
            offset = 0
        elif self._request.echo:  # a later chunk of a stream: after the echoed prompt
            offset += len(self._prompt_text[c.prompt])
        texts = [self._tokenizer.decode([t]) for t in ids]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        top = [None if score is None else self._top(token, score, alt)
               for token, score, alt in zip(ids, scores, alternatives)]
        return Logprobs(tokens=texts, token_logprobs=scores, top_logprobs=top, text_offset=offsets)

    def _top(self, token: int, logprob: float, alternatives: dict[int, float] | None) -> dict[str, float]:
        """The `logprobs` most likely tokens by their text, best first, and the chosen token (OpenAI
        returns it even outside the top N). Tokens that decode to the same text keep the best logprob."""
        top: dict[str, float] = {}
        for t, lp in list((alternatives or {}).items())[: self._request.logprobs]:
            top.setdefault(self._tokenizer.decode([t]), lp)
        top.setdefault(self._tokenizer.decode([token]), logprob)
        return top
