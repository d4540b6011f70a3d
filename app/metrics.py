"""Prometheus metrics of the serving path, through Ray's metrics API (exported with a `ray_` prefix).

Each deployment records what it alone can see:
- Ingress: time to first token and time per output token as the client sees them (from the request's
  arrival to the chunks leaving), and tokens in and out.
- Batcher: the size of the prefill batches it forms, sequences it holds (a request counts one per
  beam), and requests it turns away.
- Replica: how long requests wait for a decode slot (queue time), the prefill batches the engine runs
  (by prompt bucket), slot occupancy, the waiting queue, the KV cache's pages (used, free, and the
  fraction used: vLLM's `kv_cache_usage_perc`), preemptions (requests whose pages were taken back
  when a growing sequence found none free; they are requeued and recomputed), the prefix cache's
  queries and hits (prompt tokens, vLLM's counters: hit rate = hits / queries), and XLA compilations
  since warm-up (must stay 0: a non-zero value means a shape escaped the buckets and a request paid
  for a compile).

Serve adds the `deployment`, `replica` and `application` tags itself. Construct these objects inside a
deployment (its `__init__`), never at import time, so every process registers only its own metrics.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
PER_TOKEN_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class IngressMetrics:
    def __init__(self):
        self.ttft = Histogram(
            "gptj_time_to_first_token_seconds", "request arrival to its first token leaving the ingress",
            boundaries=LATENCY_BOUNDARIES_S, tag_keys=("api",),
        )
        self.time_per_output_token = Histogram(
            "gptj_time_per_output_token_seconds", "(last token time - first token time) / (tokens - 1), per choice",
            boundaries=PER_TOKEN_BOUNDARIES_S, tag_keys=("api",),
        )
        self.prompt_tokens = Counter("gptj_prompt_tokens", "prompt tokens of admitted requests", tag_keys=("api",))
        self.output_tokens = Counter("gptj_output_tokens", "tokens generated and returned", tag_keys=("api",))


class BatcherMetrics:
    def __init__(self):
        self.batch_size = Histogram(
            "gptj_batcher_batch_size", "requests per batch the batcher hands to a replica",
            boundaries=BATCH_SIZE_BOUNDARIES,
        )
        self.pending = Gauge("gptj_batcher_pending_requests", "sequences the batcher holds (forming, queued, decoding; "
                             "a request counts one per beam)")
        self.rejected = Counter("gptj_batcher_rejected", "requests turned away with 503 (overload)")


class ReplicaMetrics:
    def __init__(self):
        self.queue_time = Histogram(
            "gptj_queue_seconds", "time a request waits in the replica for a decode slot (submit to prefill)",
            boundaries=LATENCY_BOUNDARIES_S,
        )
        self.prefill_batch_size = Histogram(
            "gptj_prefill_batch_size", "requests per prefill the engine runs", boundaries=BATCH_SIZE_BOUNDARIES,
            tag_keys=("bucket",),
        )
        self.slots_active = Gauge("gptj_slots_active", "decode slots holding a request")
        self.slot_occupancy = Gauge("gptj_slot_occupancy", "fraction of decode slots holding a request")
        self.waiting = Gauge("gptj_waiting_requests", "requests waiting in the replica for a slot")
        self.kv_pages_used = Gauge("gptj_kv_pages_used", "KV-cache pages the replica's sequences hold")
        self.kv_pages_free = Gauge("gptj_kv_pages_free", "KV-cache pages free to hand out")
        self.kv_cache_usage = Gauge("gptj_kv_cache_usage_perc", "fraction of the KV-cache pages in use (0 to 1)")
        self.preemptions = Counter(
            "gptj_preemptions", "requests preempted for want of a free KV page (requeued and recomputed)"
        )
        self.prefix_cache_queries = Counter(
            "gptj_prefix_cache_queries", "prompt tokens admitted, recomputes included (vLLM's prefix_cache_queries)"
        )
        self.prefix_cache_hits = Counter(
            "gptj_prefix_cache_hits", "of those, tokens found in cached KV pages (vLLM's prefix_cache_hits)"
        )
        self.compilations = Gauge("gptj_compilations_since_warmup", "XLA compilations after warm-up (expected 0)")
