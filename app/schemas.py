"""The public API's shapes: OpenAI completions, the model list, Saxml's `/generate`, the error body.

The same models serve HTTP (FastAPI parses the body into them) and Python handles
(`serve.get_app_handle("gptj").generate.remote(CompletionRequest(...))`).

Completions follow OpenAI's legacy completions API. `prompt` is a string, a list of strings, a list of
token ids or a list of lists of token ids. Every field OpenAI's spec makes nullable takes `null` as its
default. `logprobs: N` returns each token's log-probability under the model's own distribution and its
N most likely alternatives (`top_logprobs`, the chosen token added when it is not among them, as
OpenAI does); with `echo` the prompt's tokens are scored too (the first has none: null), and
`max_tokens: 0` with `echo` scores the prompt only (lm-evaluation-harness's loglikelihoods). The
penalties and `logit_bias` change what is sampled, never the logprobs reported. `best_of` samples
that many candidates per prompt and returns the `n` with the highest cumulative logprob.

Extra fields beyond OpenAI's, as vLLM's OpenAI server names them: `top_k` (0 or -1: off),
`min_tokens`, `repetition_penalty`, `stop_token_ids`, `ignore_eos` (keep generating past
<|endoftext|>, for benchmarks), `use_beam_search` (beam search over `best_of` beams, greedy; the best
`n` beams are the choices) and `length_penalty`, and `stream_options.continuous_usage_stats`; and
`return_token_ids` (each choice also carries its prompt and completion token ids). `suffix` is
accepted only unset (this model cannot insert). Unknown fields are rejected: a typo never silently
changes nothing. Limits that depend on the deployment (stop sequences, top logprobs) are checked by
the ingress (app.completions), not here.

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
MAX_STOP_CHARS = 256  # characters per stop sequence (the body limit counts on it: app.completions)
MAX_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty
MAX_LOGPROBS = 20  # the ceiling of AppArgs.max_top_logprobs (vLLM's default max_logprobs); app.openapi
#                    publishes the deployment's own maximum
# JSON schema for what the field validators below enforce (the published OpenAPI document must
# refuse what the server refuses): non-empty prompts, non-empty stop strings of at most
# MAX_STOP_CHARS characters (how many: AppArgs.max_stops, which app.openapi writes in).
_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
PROMPT_SCHEMA = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1}, _IDS,
                           {"type": "array", "items": _IDS, "minItems": 1}]}
_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
STOP_SCHEMA = {"anyOf": [_STOP, {"type": "array", "items": _STOP}, {"type": "null"}]}
LOGIT_BIAS_SCHEMA = {"anyOf": [{"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                                "additionalProperties": {"type": "number", "minimum": -MAX_BIAS, "maximum": MAX_BIAS}},
                               {"type": "null"}]}


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

    include_usage: bool | None = Field(False, description="a last event with the usage, and no choices")
    continuous_usage_stats: bool | None = Field(False, description="usage so far in every event (vLLM's)")


# Fields whose `null` means their default (OpenAI's spec makes them nullable; vLLM accepts null too).
NULL_IS_DEFAULT = ("temperature", "top_p", "top_k", "n", "stop", "logprobs", "echo", "stream", "stream_options",
                   "user", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "best_of",
                   "suffix", "min_tokens", "stop_token_ids", "ignore_eos", "use_beam_search", "length_penalty",
                   "return_token_ids", "seed", "max_tokens")


class CompletionRequest(BaseModel):
    """POST /v1/completions, and the argument of the handle's `generate` / `generate_stream`."""

    # An instance from a handle caller is validated again: it may have been built with model_construct.
    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    model: str
    prompt: PromptInput = Field(json_schema_extra=PROMPT_SCHEMA)
    max_tokens: int | None = Field(None, ge=0, description="default: the app's default_max_tokens; 0 only with echo "
                                   "(the prompt is scored, nothing generated)")
    temperature: float | None = Field(1.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy")
    top_p: float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(0, ge=-1, le=INT32_MAX, description="0 or -1 = off (vLLM's extra field)")
    n: int | None = Field(1, ge=1, description="completions per prompt")
    stop: StrictStr | list[StrictStr] | None = Field(None, json_schema_extra=STOP_SCHEMA)
    seed: int | None = Field(None, ge=0, le=INT32_MAX, description="choice i of n uses (seed + i) mod 2**31")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="return each token's logprob and this many most likely "
                                 "alternatives (at most the app's max_top_logprobs, 5 by default)")
    echo: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False,
                                           description="subtracted from the logit of every token generated so far")
    frequency_penalty: float | None = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False,
                                            description="times each token was generated so far, subtracted from its logit")
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=LOGIT_BIAS_SCHEMA,
                                                description="token id -> bias in [-100, 100] added to its logit")
    best_of: int | None = Field(None, ge=1, description="candidates per prompt (>= n); the n best by cumulative "
                                "logprob are returned; with use_beam_search: the beams")
    suffix: str | None = Field(None, description="accepted only unset: this model cannot insert text")
    # vLLM's extra fields
    repetition_penalty: float | None = Field(1.0, gt=0, allow_inf_nan=False,
                                             description="transformers': logits of prompt and generated tokens divided "
                                             "by it when positive, multiplied when negative; 1 = off")
    min_tokens: int | None = Field(0, ge=0, description="EOS, stop tokens and stop strings cannot end a choice before "
                                   "this many tokens")
    stop_token_ids: list[StrictInt] | None = Field(None, description="token ids that end a choice (not returned)")
    ignore_eos: bool | None = False
    use_beam_search: bool | None = Field(False, description="beam search with best_of (or n) beams, greedy")
    length_penalty: float | None = Field(1.0, allow_inf_nan=False,
                                         description="beam search: a beam scores sum(logprobs) / length ** this")
    return_token_ids: bool | None = False

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in NULL_IS_DEFAULT)}
        return data

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
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        for text in stops:
            _check_text(text, "stop")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        for token, value in (bias or {}).items():
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"keys must be token ids (decimal integers), got {token[:40]!r}")
            if not -MAX_BIAS <= value <= MAX_BIAS:
                raise ValueError(f"the bias of token {token} must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {value}")
        return bias

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token (echo), which nothing precedes
    top_logprobs: list[dict[str, float] | None]
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
# vLLM's /tokenize and /detokenize


class TokenizeRequest(BaseModel):
    """POST /tokenize: text to token ids with the served model's tokenizer."""

    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    model: str | None = Field(None, description="optional; when given, the served model's name")
    prompt: StrictStr
    add_special_tokens: bool | None = Field(True, description="accepted; GPT-J's tokenizer adds none")
    return_token_strs: bool | None = Field(False, description="also return each token's byte-level BPE piece")

    @field_validator("prompt")
    @classmethod
    def _valid_text(cls, prompt):
        _check_text(prompt, "prompt")
        return prompt


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids to text."""

    model_config = ConfigDict(extra="forbid", revalidate_instances="always")

    model: str | None = Field(None, description="optional; when given, the served model's name")
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


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
