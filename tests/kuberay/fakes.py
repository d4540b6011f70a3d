"""What the deploy tool's tests share: RayService and Gateway payloads shaped as KubeRay v1.x and the
GKE Gateway controller write them (tests/kuberay/test_status.py checks them against the CRDs' status
schemas), and fakes of the kubernetes client's API objects."""

from __future__ import annotations

import copy
import json
import types

from kubernetes.client.exceptions import ApiException

from app.args import APP_NAME
from kuberay import cluster as cluster_mod
from kuberay import render
from kuberay.cluster import Cluster

NS = "gptj"
TPU_LABELS = {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice", "cloud.google.com/gke-tpu-topology": "2x2"}
ALL_CRDS = {k.crd for k in cluster_mod.KINDS.values() if k.crd}


def condition(type_, status, reason, message, generation=1):
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-03-02T10:15:00Z", "observedGeneration": generation}


def app_status(app="RUNNING", replica="HEALTHY", replica_message="", app_message=""):
    return {APP_NAME: {"status": app, "message": app_message, "serveDeploymentStatuses": {
        "Ingress": {"status": "HEALTHY"}, "Batcher": {"status": "HEALTHY"},
        "Replica": {"status": replica, "message": replica_message}}}}


def rayservice_with_status(status: dict, generation: int = 1) -> dict:
    obj = copy.deepcopy(next(o for o in render.render_overlay("gke-tpu").objects if o["kind"] == "RayService"))
    obj["metadata"].update(namespace=NS, generation=generation, uid="5f0c6a3e-1d2b-4c8e-9a7f-0b1c2d3e4f50")
    obj["status"] = status
    return obj


READY = {
    "conditions": [condition("Ready", "True", "NonZeroServeEndpoints", "Number of serve endpoints is greater than 0"),
                   condition("UpgradeInProgress", "False", "NoPendingCluster", "Active Ray cluster exists and no pending Ray cluster")],
    "activeServiceStatus": {"rayClusterName": "gptj-raycluster-7x2kq", "applicationStatuses": app_status(replica="UPSCALING")},
    "pendingServiceStatus": {},
    "numServeEndpoints": 1,
    "observedGeneration": 1,
    "serviceStatus": "Running",
    "lastUpdateTime": "2026-03-02T10:20:00Z",
}
INITIALIZING = {
    "conditions": [condition("Ready", "False", "Initializing", "RayService is initializing"),
                   condition("UpgradeInProgress", "False", "NoActiveCluster", "No active cluster exists")],
    "activeServiceStatus": {},
    "pendingServiceStatus": {"rayClusterName": "gptj-raycluster-7x2kq", "applicationStatuses": app_status(
        app="DEPLOYING", replica="UPDATING", replica_message="Deployment 'Replica' in application 'gptj' has 1 replicas "
                                                          "that have taken more than 30s to be scheduled.")},
    "numServeEndpoints": 0,
    "observedGeneration": 1,
}
TIMED_OUT = {
    "conditions": [condition("Ready", "False", "InitializingTimeout", "RayService has been initializing for more than 30m")],
    "numServeEndpoints": 0,
}
UPGRADING = {
    "conditions": [condition("Ready", "True", "NonZeroServeEndpoints", "Number of serve endpoints is greater than 0", 2),
                   condition("UpgradeInProgress", "True", "BothActivePendingClustersExist", "Both active and pending Ray clusters exist", 2)],
    "activeServiceStatus": {"rayClusterName": "gptj-raycluster-7x2kq", "applicationStatuses": app_status()},
    "pendingServiceStatus": {"rayClusterName": "gptj-raycluster-b9d4w", "applicationStatuses": app_status(app="DEPLOYING", replica="UPDATING")},
    "numServeEndpoints": 1,
    "observedGeneration": 2,
}
LEGACY_RUNNING = {  # KubeRay before v1.3: no conditions, only serviceStatus
    "activeServiceStatus": {"rayClusterName": "gptj-raycluster-7x2kq", "applicationStatuses": app_status()},
    "numServeEndpoints": 1,
    "serviceStatus": "Running",
}
PAYLOADS = {"ready": READY, "initializing": INITIALIZING, "timed_out": TIMED_OUT, "upgrading": UPGRADING,
            "legacy": LEGACY_RUNNING}
PROGRAMMED_GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "gptj", "namespace": NS},
    "spec": {"gatewayClassName": "gke-l7-global-external-managed", "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]},
    "status": {"addresses": [{"type": "IPAddress", "value": "34.117.10.20"}],
               "conditions": [condition("Programmed", "True", "Programmed", "")]}}


# -- fakes of the kubernetes client API objects ---------------------------------------------------


def not_found(message="not found"):
    e = ApiException(status=404, reason="Not Found")
    e.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "reason": "NotFound", "code": 404})
    return e


class FakeCustomObjects:
    """CustomObjectsApi over a dict; records every write."""

    def __init__(self, objects=None):
        self.objects = dict(objects or {})  # (plural, namespace, name) -> object
        self.writes = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        try:
            return copy.deepcopy(self.objects[(plural, namespace, name)])
        except KeyError:
            raise not_found(f'{plural}.{group} "{name}" not found') from None

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **options):
        self.writes.append(("apply", group, version, namespace, plural, name, body, options))
        self.objects[(plural, namespace, name)] = copy.deepcopy(body)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.writes.append(("delete", plural, namespace, name))
        if self.objects.pop((plural, namespace, name), None) is None:
            raise not_found()


class FakeCore:
    def __init__(self, node_labels=()):
        self.node_labels = list(node_labels)
        self.writes = []
        self.selectors = []

    def list_node(self, label_selector=""):
        self.selectors.append(label_selector)
        wanted = dict(kv.split("=", 1) for kv in label_selector.split(",") if kv)
        items = [types.SimpleNamespace(metadata=types.SimpleNamespace(labels=labels))
                 for labels in self.node_labels if wanted.items() <= labels.items()]
        return types.SimpleNamespace(items=items)

    def patch_namespaced_service_account(self, name, namespace, body, **options):
        self.writes.append(("apply", name, namespace, body, options))

    def delete_namespaced_service_account(self, name, namespace):
        self.writes.append(("delete", name, namespace))


class FakeExtensions:
    def __init__(self, installed=ALL_CRDS):
        self.installed = set(installed)

    def read_custom_resource_definition(self, name):
        if name not in self.installed:
            raise not_found(f'customresourcedefinitions.apiextensions.k8s.io "{name}" not found')
        return {"metadata": {"name": name}}


def fake_cluster(objects=None, node_labels=(TPU_LABELS,), installed=ALL_CRDS) -> Cluster:
    return Cluster(FakeCustomObjects(objects), FakeCore(node_labels), FakeExtensions(installed), NS)
