"""The Replica autoscaling policy (app.autoscaling), on Serve's own AutoscalingContext and wrapper."""

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from app.args import APP_NAME
from app.autoscaling import HELD_REQUESTS, held_requests_policy

DEPLOYMENT = DeploymentID(name="Replica", app_name=APP_NAME)
CONFIG = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=32, upscale_delay_s=0,
                           downscale_delay_s=0)


def context(held: list[float], batch_calls: float, config: AutoscalingConfig = CONFIG) -> AutoscalingContext:
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(len(held))]
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name="Replica", app_name=APP_NAME, current_num_replicas=len(held),
        target_num_replicas=len(held), running_replicas=replicas, total_num_requests=batch_calls,
        total_queued_requests=0, aggregated_metrics={HELD_REQUESTS: dict(zip(replicas, held))} if held else {},
        raw_metrics={}, capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas, policy_state={}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=None, config=config,
    )


@pytest.mark.parametrize("held, batch_calls, desired", [
    ([32.0], 4, 1),  # 32 requests in 4 batch calls: at target, whatever the batching
    ([40.0], 5, 2),  # 8 wait for a slot: one more replica
    ([64.0, 64.0], 16, 4),
    ([64.0, 64.0, 64.0, 64.0], 32, 4),  # never above max_replicas
    ([3.0, 2.0], 2, 1),  # light load: back to one
    ([0.0], 0, 1),  # idle: min_replicas
])
def test_scales_on_requests_held_not_batch_calls(held, batch_calls, desired):
    policy = _apply_autoscaling_config(held_requests_policy)  # what Serve wraps a custom policy in
    replicas, _ = policy(context(held, batch_calls))
    bounded = min(max(replicas, CONFIG.min_replicas), CONFIG.max_replicas)  # as Serve does next
    assert bounded == desired


def test_falls_back_to_serves_count_until_replicas_report():
    assert held_requests_policy(context([], 64))[0] == 64 / 32
