"""kuberay.cluster without a cluster: request building, the cluster-config change check, waiting
until ready, and the Cluster wrapper's error messages, with fakes of the kubernetes client's API objects."""

from __future__ import annotations

import copy

import pytest
from kubernetes.client.exceptions import ApiException

from app.args import APP_NAME
from kuberay import cluster as cluster_mod
from kuberay import render
from kuberay import status as status_mod
from kuberay.cluster import Cluster, DeployError
from tests.kuberay.fakes import (INITIALIZING, NS, READY, TPU_LABELS, FakeCore, FakeCustomObjects, FakeExtensions,
                                 rayservice_with_status)


# -- request building -----------------------------------------------------------------------------


def test_apply_requests_place_objects_and_hash_the_cluster_config():
    objects = render.render_overlay("gke-tpu").objects
    requests = cluster_mod.apply_requests(objects, NS)
    assert [r.kind for r in requests] == [o["kind"] for o in objects]
    assert all(r.body["metadata"]["namespace"] == NS for r in requests)
    assert "namespace" not in objects[0]["metadata"], "rendered objects are not modified"
    (rs,) = [r for r in requests if r.kind == "RayService"]
    assert rs.api.plural == "rayservices" and rs.api.group == "ray.io"
    assert rs.body["metadata"]["annotations"][cluster_mod.CLUSTER_CONFIG_HASH] == cluster_mod.cluster_config_hash(rs.body)
    assert [r.kind for r in cluster_mod.delete_requests(objects, NS)][:2] == ["PodMonitoring", "GCPBackendPolicy"]
    with pytest.raises(DeployError, match="HorizontalPodAutoscaler"):
        cluster_mod.apply_requests([{"kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"}}], NS)


def test_required_crds_and_tpu_selectors():
    gke, cpu = render.render_overlay("gke-tpu").objects, render.render_overlay("cpu").objects
    assert cluster_mod.required_crds(gke) == [
        "rayservices.ray.io", "gateways.gateway.networking.k8s.io", "httproutes.gateway.networking.k8s.io",
        "healthcheckpolicies.networking.gke.io", "gcpbackendpolicies.networking.gke.io",
        "podmonitorings.monitoring.googleapis.com"]
    assert cluster_mod.required_crds(cpu) == ["rayservices.ray.io"]
    assert cluster_mod.tpu_node_selectors(gke) == [TPU_LABELS]
    assert cluster_mod.tpu_node_selectors(cpu) == []


def test_cluster_change_only_for_cluster_config_edits():
    objects = render.render_overlay("gke-tpu").objects
    (desired,) = [r for r in cluster_mod.apply_requests(objects, NS) if r.kind == "RayService"]
    live = copy.deepcopy(desired.body)
    assert cluster_mod.cluster_change(None, desired) is None
    assert cluster_mod.cluster_change(live, desired) is None
    serve_only = copy.deepcopy(objects)
    next(o for o in serve_only if o["kind"] == "RayService")["spec"]["serveConfigV2"] += "\n# edited\n"
    (desired_serve,) = [r for r in cluster_mod.apply_requests(serve_only, NS) if r.kind == "RayService"]
    assert cluster_mod.cluster_change(live, desired_serve) is None, "serveConfigV2 updates in place"
    (desired_image,) = [r for r in cluster_mod.apply_requests(
        render.render_overlay("gke-tpu", image="example.com/other:2").objects, NS) if r.kind == "RayService"]
    assert "--recreate" in cluster_mod.cluster_change(live, desired_image)


# -- waiting, and the wrapper's errors ------------------------------------------------------------


def test_wait_until_ready_polls_and_times_out():
    sequence = iter([INITIALIZING, INITIALIZING, READY])
    now = [0.0]
    messages = []
    result = cluster_mod.wait_until_ready(
        lambda: status_mod.parse_rayservice(rayservice_with_status(next(sequence))), APP_NAME, timeout_s=100,
        poll_s=10, report=messages.append, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert result.app(APP_NAME).status == "RUNNING" and now[0] == 20
    assert len(messages) == 2 and messages[0].startswith("waiting: Ready=False") and messages[1].startswith("ready:")

    now[0] = 0.0
    with pytest.raises(DeployError, match=r"not ready after 30s.*Initializing"):
        cluster_mod.wait_until_ready(
            lambda: status_mod.parse_rayservice(rayservice_with_status(INITIALIZING)), APP_NAME, timeout_s=30,
            poll_s=10, report=lambda _: None, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))


def test_forbidden_is_explained():
    class Forbidden(FakeExtensions):
        def read_custom_resource_definition(self, name):
            raise ApiException(status=403, reason="Forbidden")

    cluster = Cluster(FakeCustomObjects(), FakeCore(), Forbidden(), NS)
    with pytest.raises(DeployError, match="not allowed.*get-credentials"):
        cluster.preflight(render.render_overlay("cpu").objects)
