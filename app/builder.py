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
  nothing but the replica may open the chips). The ingress also gets a finite queue in Serve's router,
  twice the batcher's limit, as a last guard: past it Serve answers 503 with Retry-After itself
  (plain text), before the request reaches the ingress. Serve counts requests still being assigned
  to a replica as queued, so a burst can trip this guard a little before the batcher's limit would.

No `from __future__ import annotations` here: Serve reads `build_app`'s annotation to validate `args`.
"""

from ray.serve import Application, Deployment

from app.args import AppArgs
from app.batcher import Batcher
from app.ingress import Ingress
from app.replica import DriverFactory, Replica, load_driver

CONTROL_CALLS = 16  # headroom over the request limit for readiness, stats and cancel calls
CPU_ONLY = {"num_cpus": 0, "runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}}


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
    return Ingress.options(
        ray_actor_options=CPU_ONLY,
        max_ongoing_requests=limit,
        max_queued_requests=2 * args.max_pending_requests,
        backpressure_config={"status_code": 503, "retry_after_s": args.retry_after_s},
    ).bind(batcher, args)
