"""Replica autoscaling on the requests each model replica holds, not on its batch calls.

Serve's default policy scales a deployment on its "ongoing requests", which for the model Replica
are the batcher's batch calls: one call carries up to `batch_max_size` requests and lasts until the
last of them finishes, so the same load reads as 8 ongoing requests or as 1 depending on how it was
batched. Each Replica instead reports how many requests it holds (decoding or waiting for a slot)
through `record_autoscaling_stats` (Serve's custom autoscaling metrics), and this policy asks for

    replicas = sum of the running replicas' held requests / target_ongoing_requests

(a beam search counts one per beam: its beams take that many decode slots)

with `target_ongoing_requests` read as requests per replica (set it to the slot count: scale out
when requests start to wait for a slot). Serve applies the rest of the autoscaling config around it
(min/max replicas, upscale/downscale delays and factors). Until a replica has reported (it just
started), the policy falls back to Serve's own count. The controller's log says which signal the
policy scales on whenever that changes (`Replica autoscaling signal: held_requests ...`).

Enable it per deployment:
    autoscaling_config: {..., policy: {policy_function: "app.autoscaling:held_requests_policy"}}
"""

from __future__ import annotations

import logging
from typing import Any

HELD_REQUESTS = "held_requests"  # the metric each Replica reports
SERVE_CALLS = "serve_calls"  # the fallback: Serve's count of ongoing batch calls
SIGNAL_LOG = "Replica autoscaling signal: "

logger = logging.getLogger("ray.serve")


def held_requests_policy(ctx) -> tuple[float, dict[str, Any]]:
    """Desired replica count (Serve rounds it and applies bounds and delays); `ctx` is Serve's
    AutoscalingContext."""
    target = ctx.config.get_target_ongoing_requests()
    held = (ctx.aggregated_metrics or {}).get(HELD_REQUESTS, {})
    if ctx.current_num_replicas == 0 or not held:
        signal, load = SERVE_CALLS, ctx.total_num_requests  # nothing reported yet
    else:
        signal, load = HELD_REQUESTS, sum(held.values())
    if ctx.policy_state.get("signal") != signal:
        logger.info(f"{SIGNAL_LOG}{signal} ({ctx.deployment_name}: {load:g} over {ctx.current_num_replicas} "
                    f"replicas, target {target:g} per replica)")
    return load / target, {"signal": signal}
