"""The application's one typed args object: what `serve_config.yaml` / `serveConfigV2` `args:` hold.

`app.builder:build_app(args: AppArgs)` is the Serve import path; Ray validates the YAML `args`
dict into this model, so a typo or a bad value fails at deploy time with the field's name.
This module imports neither Ray nor JAX, so the KubeRay renderer and tests can use it anywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

APP_NAME = "gptj"  # the Serve application's name (serve_config.yaml's `name:`), for kuberay/, bench/, tests


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- the model -------------------------------------------------------------------------------
    model_name: str = Field("gpt-j-6b", description="the name clients use (OpenAI `model`, Saxml `model`)")
    checkpoint: str = Field("tiny", description="preset (tiny, small, gptj-6b), HF or native dir, or gs:// URI")
    dtype: Literal["float32", "bfloat16"] = "float32"
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8 weight-only quantization at load (an int8 native checkpoint loads int8 either way)"
    )
    kv_cache_dtype: Literal["auto", "int8"] = Field("auto", description="int8: KV cache with per-token-per-head scales")
    mesh: int = Field(1, description="devices the replica shards the model over (4 on a TPU v5e 2x2 host)")
    tpu_chips: Literal[0, 1, 2, 4, 8] = Field(0, description="TPU chips the replica requests (0 locally, 4 on GKE)")

    # -- the engine ------------------------------------------------------------------------------
    prompt_buckets: tuple[int, ...] = (32, 128, 512)
    prefill_batch_buckets: tuple[int, ...] = (1, 4, 8)
    slots: int = Field(
        8, ge=1, description="decode batch: sequences decoded per step (not a memory reservation: the KV cache "
        "is paged, and a request is admitted only when its pages are free too)"
    )
    replica_threads: int = Field(
        0, ge=0, description="OMP_NUM_THREADS for the replica's XLA CPU work; 0: every core of its host "
        "(Ray forces 1 on an actor that reserves no CPU, which makes CPU inference several times slower)"
    )
    max_cache_len: int | None = Field(
        None, ge=1, description="the longest context a sequence may reach (default: model n_positions)"
    )
    page_size: int = Field(16, ge=1, description="tokens per KV-cache page")
    kv_pages: int | None = Field(
        None, ge=1, description="usable KV pages in the pool; default: sized from device memory (hbm_utilization), "
        "else slots x pages per max_cache_len"
    )
    hbm_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of each device's memory the weights and the KV pool may take "
        "together (vLLM's gpu_memory_utilization); sizes the pool when kv_pages is not set"
    )
    prefill_chunk_tokens: int | None = Field(
        512, ge=1, description="chunked prefill: a longer prompt is prefilled this many tokens per step while the "
        "others decode, and it is each step's prefill budget (a multiple of page_size; fitted down to max_cache_len); "
        "None: whole prompts only (then no prefix caching)"
    )
    enable_prefix_caching: bool = Field(
        True, description="requests share the KV pages of a common prompt prefix (full pages, matched token for "
        "token) and prefill only the rest; needs prefill_chunk_tokens"
    )

    # -- the batcher -----------------------------------------------------------------------------
    batch_max_size: int = Field(
        8, ge=1, description="largest prefill batch the batcher forms, in sequences (a request counts one per beam)"
    )
    batch_wait_ms: float = Field(5.0, ge=0, description="how long the batcher waits to fill a batch")
    max_pending_requests: int = Field(
        64, ge=1,
        description="sequences the batcher holds (forming a batch, waiting for a slot or decoding; a request counts "
        "one per beam); a request that would take it beyond gets 503",
    )
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After a 503 for overload carries")
    stall_timeout_s: float = Field(
        120.0, gt=0, description="a replica whose engine loop makes no step for this long fails its health check"
    )

    # -- the HTTP API ----------------------------------------------------------------------------
    default_max_tokens: int = Field(16, ge=1)
    max_request_bytes: int | None = Field(
        None, ge=1024, description="larger bodies get 413; None: what the largest valid request can use "
        "(app.completions.default_request_bytes: max_prompts prompts of the longest bucket, max_stops stop strings)"
    )
    max_prompts: int = Field(8, ge=1, description="prompts in one request (a list of prompts); more get 400")
    request_body_timeout_s: float = Field(
        10.0, gt=0, description="a body that has not fully arrived this long after the ingress began to read it "
        "gets 408 and the connection is closed (app.guard)"
    )
    max_ingress_requests: int | None = Field(
        None, ge=1, description="model requests one ingress replica holds at once (reading the body, tokenising, "
        "waiting); at the bound the longest-running upload, if stalled (app.guard.STALLED_AFTER_S), is given "
        "up on (408), else the newcomer gets 503. None: max_pending_requests + 64"
    )
    max_header_count: int = Field(64, ge=8, description="requests with more headers get 431")
    max_header_bytes: int = Field(16384, ge=1024, description="requests with more bytes of headers get 431")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="largest max_tokens a request may ask for (400 above it); None: what fits the context"
    )
    max_n: int = Field(8, ge=1, description="largest `n` (completions per prompt), and of `best_of`")
    max_stops: int = Field(16, ge=1, description="stop sequences per request (OpenAI allows 4; lm-evaluation-harness "
                           "sends a task's stops plus EOS)")
    max_top_logprobs: int = Field(5, ge=0, le=20, description="largest `logprobs` (most likely alternatives per "
                                  "token); the engine computes this many for every prompt position it scores")
    saxml_tokenized: bool = Field(
        False, description="/generate takes `query` as comma-separated token ids and answers each beam's token ids "
        "the same way, as Saxml's GPTJ4Tokenized servables (TOKENIZED_INPUT / TOKENIZED_OUTPUT) did for MLPerf"
    )
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="the environment variable holding the key HTTP clients must send as `Authorization: Bearer "
        "<key>` (401 otherwise); None: no key. The config names the variable, never the key (on GKE a Secret "
        "sets it on the head pod, where the ingress runs)",
    )
    # 8 tokens / 50 ms: a stream still moves 20 times a second (a request's first and last tokens
    # leave at once), and the relay does a fraction of the per-token work (docs/BENCHMARKS.md).
    stream_chunk_tokens: int = Field(8, ge=1, description="tokens relayed per streaming chunk between deployments")
    stream_chunk_ms: float = Field(50.0, ge=0, description="or after this long, whichever comes first")

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        if self.mesh not in (1, 2, 4, 8):
            raise ValueError(f"mesh must be 1, 2, 4 or 8, got {self.mesh}")
        if self.tpu_chips and self.mesh > self.tpu_chips:
            raise ValueError(f"mesh={self.mesh} needs at least that many chips, tpu_chips={self.tpu_chips}")
        if self.batch_max_size > self.slots:
            raise ValueError(f"batch_max_size={self.batch_max_size} exceeds slots={self.slots}")
        if self.max_tokens_limit is not None and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens={self.default_max_tokens} exceeds max_tokens_limit={self.max_tokens_limit}"
            )
        if self.prefill_batch_buckets and max(self.prefill_batch_buckets) > self.slots:
            raise ValueError(f"prefill_batch_buckets={list(self.prefill_batch_buckets)} exceed slots={self.slots}")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens % self.page_size:
            raise ValueError(f"prefill_chunk_tokens={self.prefill_chunk_tokens} must be a multiple of "
                             f"page_size={self.page_size}")
        if self.enable_prefix_caching and self.prefill_chunk_tokens is None:
            raise ValueError("enable_prefix_caching needs prefill_chunk_tokens (the rest of a prompt after its "
                             "cached prefix is prefilled as a chunk)")
        return self

    @property
    def ingress_request_limit(self) -> int:
        """`max_ingress_requests`, or its default: room for every request the batcher admits and 64 uploads."""
        return self.max_ingress_requests or self.max_pending_requests + 64

    def engine_options(self, prompt_buckets: tuple[int, ...] | None = None, cache_len: int | None = None) -> dict:
        """The paged engine's config fields (model.engine.paged.EngineConfig) these args give: the one
        mapping the replica serves with and bench.lower lowers. `prompt_buckets` replaces the args'
        own (the replica fits them to the checkpoint's context); `cache_len`, the context, caps the
        chunk (whole pages)."""
        chunk = self.prefill_chunk_tokens
        if chunk is not None and cache_len is not None:
            chunk = min(chunk, cache_len // self.page_size * self.page_size)
        return dict(
            prompt_buckets=tuple(prompt_buckets or self.prompt_buckets), batch_buckets=tuple(self.prefill_batch_buckets),
            slots=self.slots, max_cache_len=self.max_cache_len, kv_cache_dtype=self.kv_cache_dtype,
            page_size=self.page_size, num_pages=self.kv_pages, hbm_utilization=self.hbm_utilization,
            prefill_chunk_tokens=chunk, enable_prefix_caching=self.enable_prefix_caching,
            max_top_logprobs=self.max_top_logprobs,
        )
