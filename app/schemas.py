"""The public API's shapes: OpenAI completions, the model list, Saxml's `/generate`, the error body.

The same models serve HTTP (FastAPI parses the body into them) and Python handles
(`serve.get_app_handle("gptj").generate.remote(CompletionRequest(...))`).

Completions follow OpenAI's legacy completions API. `prompt` is a string, a list of strings, a list of
token ids or a list of lists of token ids. Extra fields beyond OpenAI's: `top_k`, `ignore_eos` (keep
generating past <|endoftext|>, for benchmarks) and `return_token_ids` (each choice also carries its
prompt and completion token ids). OpenAI fields this server cannot honour are accepted only at their
neutral values (penalties 0, no logit_bias, no suffix, best_of = n), so a client that sends the
defaults works and one that asks for more is told so. Unknown fields are rejected: a typo never
silently changes nothing. `logprobs` gives the chosen tokens' log-probabilities (the model's own
distribution); top alternatives are not computed, so `top_logprobs` is null.

Saxml's HTTP server took `{"model", "query", "extra_inputs": {...}}` and answered
`{"generate_response": [[text, score], ...]}`, score being the sum of the chosen tokens' log-probabilities;
with `extra_inputs.beam_size` > 1 (Saxml's name for the beam count, a servable setting there) the list
holds every finished beam, best first, each scored as transformers' `sequences_scores`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

PromptInput = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
INT32_MAX = 2**31 - 1  # the engine holds top_k and seeds as int32
MAX_TEMPERATURE = 2.0  # OpenAI's range; the engine divides by it in float32
MAX_STOPS = 4  # stop sequences per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop sequence (the body limit counts on it: app.completions)
# JSON schema for what the field validators below enforce (the published OpenAPI document must
# refuse what the server refuses): non-empty prompts, at most 4 non-empty stop strings of at most
# MAX_STOP_CHARS characters.
_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
PROMPT_SCHEMA = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1}, _IDS,
                           {"type": "array", "items": _IDS, "minItems": 1}]}
_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
STOP_SCHEMA = {"anyOf": [_STOP, {"type": "array", "items": _STOP, "maxItems": MAX_STOPS}, {"type": "null"}]}


def _check_text(text: str, what: str) -> None:
    """Refuse a str that is not valid Unicode (a lone surrogate): JSON cannot carry one, but a
    Python handle caller can, and the tokenizer would fail on it. (A constrained str field, like
    Saxml's `query`, gets this check from pydantic itself.)"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode ({e.reason} at index {e.start})") from None


def _omit_none(value) -> bool:
    return value is None


def prompt_list(prompt: PromptInput) -> list[str] | list[list[int]]:
    """The prompts a `prompt` field holds, as a list: [text], [text, ...], [ids] or [ids, ...]. The one
    place that tells the four shapes apart (the field's validator and the ingress's tokenising use it)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


# ---------------------------------------------------------------------------------------------
# OpenAI completions


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions, and the argument of the handle's `generate` / `generate_stream`."""

    # An instance from a handle caller is validated again: it may have been built with model_construct.
    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    model: str
    prompt: PromptInput = Field(json_schema_extra=PROMPT_SCHEMA)
    max_tokens: int | None = Field(None, ge=1, description="default: the app's default_max_tokens")
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=INT32_MAX, description="0 = off (an extra field, not in OpenAI's API)")
    n: int = Field(1, ge=1, description="completions per prompt")
    stop: StrictStr | list[StrictStr] | None = Field(None, json_schema_extra=STOP_SCHEMA)
    seed: int | None = Field(None, ge=0, le=INT32_MAX, description="choice i of n uses (seed + i) mod 2**31")
    logprobs: int | None = Field(None, ge=0, le=5, description="return chosen-token logprobs")
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    # Accepted for compatibility at their neutral values only.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt):
        prompts = prompt_list(prompt)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must not be empty (nor contain an empty prompt)")
        for p in prompts:
            if isinstance(p, str):
                _check_text(p, "prompt")
        return prompt

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        for text in stops:
            _check_text(text, "stop")
        return stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value, info):
        if value != 0:
            raise ValueError(f"{info.field_name} is not supported (only 0)")
        return value

    @field_validator("logit_bias", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @model_validator(mode="after")
    def _compatible(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (leave it unset or equal to n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported (prompt logprobs are not computed)")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_omit_none)
    token_ids: list[int] | None = Field(None, exclude_if=_omit_none)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """The whole result (stream=false), or, with object "text_completion" too, one stream event."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# A stream event is one model with the response, not a subclass: OpenAI's stream events are
# "text_completion" objects of the same shape (the official client parses both with one class), and
# each carries the choices that advanced, with their new text (usage only in the last, when asked).
# The name stays for handle callers (README): `generate_stream` yields CompletionChunks.
CompletionChunk = CompletionResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptj-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------------
# Saxml /generate


class SaxmlExtraInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy")
    per_example_max_decode_steps: int | None = Field(None, ge=1, description="default: default_max_tokens")
    per_example_top_k: int = Field(0, ge=0, le=INT32_MAX, description="0 = off")
    per_example_top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    beam_size: int = Field(1, ge=1, le=INT32_MAX, description="beams to search with (1: no beam search; > 1 needs "
                           "temperature 0); the answer lists every finished beam, best first")
    per_example_min_decode_steps: int = Field(
        0, ge=0, le=INT32_MAX, description="tokens generated before EOS may end a sequence (Saxml's MIN_DECODE_STEPS)"
    )
    length_penalty: float = Field(
        1.0, allow_inf_nan=False, description="beam search: a finished beam scores sum(logprobs) / length ** this "
        "(transformers' length_penalty, not praxis' length_norm_alpha)"
    )


class SaxmlGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    model: str
    query: StrictStr = Field(min_length=1, description="the prompt; with the app's saxml_tokenized, its token ids "
                             "comma-separated")
    extra_inputs: SaxmlExtraInputs = SaxmlExtraInputs()


class SaxmlGenerateResponse(BaseModel):
    generate_response: list[tuple[str, float]]


# ---------------------------------------------------------------------------------------------
# Errors (OpenAI's shape, also used by /generate)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
