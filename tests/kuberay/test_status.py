"""kuberay.status: parsing RayService status payloads shaped as KubeRay v1.x writes them (checked
against the CRD's status schema), readiness verdicts, and the Gateway's URL."""

from __future__ import annotations

import copy

import pytest

from app.args import APP_NAME
from kuberay import status as status_mod
from tests.kuberay import schemas
from tests.kuberay.fakes import (INITIALIZING, LEGACY_RUNNING, NS, PAYLOADS, PROGRAMMED_GATEWAY, READY, TIMED_OUT,
                                 UPGRADING, app_status, rayservice_with_status)


# -- the payloads are what KubeRay writes ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_status_payloads_follow_the_crd_status_schema(name):
    assert schemas.errors(rayservice_with_status(PAYLOADS[name])) == []


def test_gateway_payload_follows_the_crd_schema():
    assert schemas.errors(PROGRAMMED_GATEWAY) == []


# -- status parsing -------------------------------------------------------------------------------


def test_parse_ready_rayservice():
    status = status_mod.parse_rayservice(rayservice_with_status(READY))
    assert (status.name, status.namespace, status.generation) == ("gptj", NS, 1)
    assert status.condition("Ready").reason == "NonZeroServeEndpoints"
    assert status.active_cluster == "gptj-raycluster-7x2kq" and status.pending_cluster is None
    assert not status.upgrading
    app = status.app(APP_NAME)
    assert app.status == "RUNNING"
    assert {d.name: d.status for d in app.deployments} == {"Batcher": "HEALTHY", "Ingress": "HEALTHY", "Replica": "UPSCALING"}
    verdict = status_mod.readiness(status, APP_NAME)
    assert verdict.ready and "1 serve endpoint" in verdict.reason


def test_initializing_reports_what_serve_says():
    verdict = status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(INITIALIZING)), APP_NAME)
    assert not verdict.ready and not verdict.failed
    assert "Ready=False (Initializing" in verdict.reason


def test_initializing_timeout_is_a_failure():
    verdict = status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(TIMED_OUT)), APP_NAME)
    assert verdict.failed and "30m" in verdict.reason


def test_stale_generation_is_not_ready():
    verdict = status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(READY, generation=2)), APP_NAME)
    assert not verdict.ready and "generation 2" in verdict.reason


def test_upgrade_in_progress_keeps_serving_from_the_active_cluster():
    status = status_mod.parse_rayservice(rayservice_with_status(UPGRADING, generation=2))
    assert status.upgrading and status.pending_cluster == "gptj-raycluster-b9d4w"
    assert status_mod.readiness(status, APP_NAME).ready
    text = status_mod.format_status(status)
    assert "pending cluster: gptj-raycluster-b9d4w" in text and "condition UpgradeInProgress=True" in text


def test_unhealthy_deployment_and_legacy_status():
    degraded = copy.deepcopy(READY)
    degraded["activeServiceStatus"]["applicationStatuses"] = app_status(
        app="DEPLOY_FAILED", replica="UNHEALTHY", replica_message="The replica's constructor raised: out of HBM",
        app_message="Failed to update the deployments ['Replica'].")
    verdict = status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(degraded)), APP_NAME)
    assert not verdict.ready and "DEPLOY_FAILED" in verdict.reason and "Replica UNHEALTHY: The replica's constructor raised" in verdict.reason
    assert status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(LEGACY_RUNNING)), APP_NAME).ready


def test_gateway_url():
    gateway = {"spec": {"listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]},
               "status": {"addresses": [{"type": "IPAddress", "value": "34.117.10.20"}],
                          "conditions": [{"type": "Programmed", "status": "True"}]}}
    assert status_mod.gateway_url(gateway) == "http://34.117.10.20"
    gateway["spec"]["listeners"][0]["port"] = 8080
    assert status_mod.gateway_url(gateway) == "http://34.117.10.20:8080"
    gateway["status"]["conditions"][0]["status"] = "False"
    assert status_mod.gateway_url(gateway) is None
    assert status_mod.gateway_url({"spec": {}, "status": {}}) is None
