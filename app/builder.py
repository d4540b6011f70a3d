"""The application builder: the one place the deployment graph is bound (`bind_app`).

    serve run serve_config.yaml                  (import_path: app.builder:build_app; `args:` is AppArgs)
    serve.run(build_app(AppArgs(...)), name="gptj", route_prefix="/")

    HTTP -> Ingress -> Batcher -> Replica (engine + weights)

Options derived from the args (a Serve config's per-deployment keys override them; note that a
config's `ray_actor_options` replaces these dicts whole):
- Replica: `{"TPU": tpu_chips}` when tpu_chips > 0, no other resource (locally nothing at all);
  `max_ongoing_requests` covers one batch call per admitted request, so the replica never queues
  what the batcher already admitted.
- Batcher and Ingress: num_cpus 0 (asyncio I/O; on a 2-core machine the default CPU each would
  leave nothing for the replica) and JAX_PLATFORMS=cpu (neither imports JAX, and on a TPU host
  nothing but the replica may open the chips). The ingress bounds its model requests itself
  (`max_ingress_requests`, app.guard) and streams it has answered are bounded by the batcher's
  `max_pending_requests`, so its `max_ongoing_requests` is the sum of the two plus CONTROL_CALLS: Serve
  never makes /healthz, /readyz or /v1/stats wait behind model requests or their bodies. It also gets
  a finite queue in Serve's router, INGRESS_QUEUE_FACTOR times as deep as the ingress holds, as a last
  guard: past it Serve answers 503 with Retry-After itself (plain text), before the request reaches
  the ingress, and that refusal would hit /readyz (the load balancer's health check) as well. Requests
  wait there when arrivals outrun what the ingress's event loop can even refuse (a saturated CPU),
  and a burst fills it for a moment (Serve counts requests still being assigned as queued): deep
  enough that a 5x overload on 2 cores never reaches the bound (tests/reliability/test_overload.py).

No `from __future__ import annotations` here: Serve reads `build_app`'s annotation to validate `args`.
"""

from ray.serve import Application, Deployment

from app.args import AppArgs
from app.batcher import Batcher
from app.ingress import Ingress
from app.driver import load_driver
from app.replica import DriverFactory, Replica

CONTROL_CALLS = 16  # headroom over the request limit for readiness, stats and cancel calls
INGRESS_QUEUE_FACTOR = 4  # Serve's queue in front of the ingress, in multiples of its max_ongoing_requests
CPU_ONLY = {"num_cpus": 0, "runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}}
# glibc's malloc for the ingress: buffers of 64 KiB and more (request bodies) are mapped and unmapped
# on their own instead of raising the heap's high-water mark for good, and two arenas, not one per
# thread (the tokenising threads): the process gives back what a burst of large bodies took.
INGRESS_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
INGRESS_OPTIONS = {"num_cpus": 0, "runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu", **INGRESS_MALLOC_ENV}}}


def replica_actor_options(args: AppArgs) -> dict:
    options: dict = {"num_cpus": 0}
    if args.tpu_chips:
        options["resources"] = {"TPU": args.tpu_chips}
    return options


def build_app(args: AppArgs) -> Application:
    """Bind Ingress -> Batcher -> Replica for `args` (Serve validates a config's `args:` into AppArgs)."""
    return bind_app(args)


def bind_app(args: AppArgs, replica: Deployment = Replica, driver_factory: DriverFactory = load_driver) -> Application:
    """The graph with a given model deployment and driver factory: tests bind a fault-injecting replica
    class (tests/reliability/faulty.py) or a driver over the mock engine (tests/mock_driver.py)."""
    limit = args.max_pending_requests + CONTROL_CALLS
    replica = replica.options(ray_actor_options=replica_actor_options(args), max_ongoing_requests=limit).bind(
        args, driver_factory
    )
    batcher = Batcher.options(ray_actor_options=CPU_ONLY, max_ongoing_requests=limit).bind(replica, args)
    ingress_limit = args.ingress_request_limit + args.max_pending_requests + CONTROL_CALLS
    return Ingress.options(
        ray_actor_options=INGRESS_OPTIONS,
        max_ongoing_requests=ingress_limit,
        max_queued_requests=INGRESS_QUEUE_FACTOR * ingress_limit,
        backpressure_config={"status_code": 503, "retry_after_s": args.retry_after_s},
    ).bind(batcher, args)
