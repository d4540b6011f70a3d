"""The deploy tool without a cluster: request building, status parsing on payloads shaped as KubeRay
v1.x writes them (checked against the CRD's status schema), and the error paths, with fakes of the
kubernetes client's API objects."""

from __future__ import annotations

import copy
import json
import types

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kuberay import __main__ as cli
from kuberay import cluster as cluster_mod
from kuberay import render
from kuberay import status as status_mod
from kuberay.cluster import Cluster, DeployError
from tests.kuberay import schemas

NS = "gptj"
TPU_LABELS = {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice", "cloud.google.com/gke-tpu-topology": "2x2"}
ALL_CRDS = {k.crd for k in cluster_mod.KINDS.values() if k.crd}


def condition(type_, status, reason, message, generation=1):
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-03-02T10:15:00Z", "observedGeneration": generation}


def app_status(app="RUNNING", replica="HEALTHY", replica_message="", app_message=""):
    return {"gptj": {"status": app, "message": app_message, "serveDeploymentStatuses": {
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


@pytest.fixture
def use_cluster(monkeypatch):
    """Make the CLI talk to a given fake Cluster."""
    def install(cluster: Cluster) -> Cluster:
        monkeypatch.setattr(cli, "connect", lambda context=None: cluster)
        return cluster
    return install


FILLED = ["--checkpoint", "gs://my-bucket/gptj-6b-native", "--image", "us-docker.pkg.dev/p/gptj/gptj-serve:v1"]


# -- the payloads are what KubeRay writes ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_status_payloads_follow_the_crd_status_schema(name):
    assert schemas.errors(rayservice_with_status(PAYLOADS[name])) == []


# -- status parsing -------------------------------------------------------------------------------


def test_parse_ready_rayservice():
    status = status_mod.parse_rayservice(rayservice_with_status(READY))
    assert (status.name, status.namespace, status.generation) == ("gptj", NS, 1)
    assert status.condition("Ready").reason == "NonZeroServeEndpoints"
    assert status.active_cluster == "gptj-raycluster-7x2kq" and status.pending_cluster is None
    assert not status.upgrading
    app = status.app("gptj")
    assert app.status == "RUNNING"
    assert {d.name: d.status for d in app.deployments} == {"Batcher": "HEALTHY", "Ingress": "HEALTHY", "Replica": "UPSCALING"}
    verdict = status_mod.readiness(status, "gptj")
    assert verdict.ready and "1 serve endpoint" in verdict.reason


def test_initializing_reports_what_serve_says():
    verdict = status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(INITIALIZING)), "gptj")
    assert not verdict.ready and not verdict.failed
    assert "Ready=False (Initializing" in verdict.reason


def test_initializing_timeout_is_a_failure():
    verdict = status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(TIMED_OUT)), "gptj")
    assert verdict.failed and "30m" in verdict.reason


def test_stale_generation_is_not_ready():
    verdict = status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(READY, generation=2)), "gptj")
    assert not verdict.ready and "generation 2" in verdict.reason


def test_upgrade_in_progress_keeps_serving_from_the_active_cluster():
    status = status_mod.parse_rayservice(rayservice_with_status(UPGRADING, generation=2))
    assert status.upgrading and status.pending_cluster == "gptj-raycluster-b9d4w"
    assert status_mod.readiness(status, "gptj").ready
    text = status_mod.format_status(status)
    assert "pending cluster: gptj-raycluster-b9d4w" in text and "condition UpgradeInProgress=True" in text


def test_unhealthy_deployment_and_legacy_status():
    degraded = copy.deepcopy(READY)
    degraded["activeServiceStatus"]["applicationStatuses"] = app_status(
        app="DEPLOY_FAILED", replica="UNHEALTHY", replica_message="The replica's constructor raised: out of HBM",
        app_message="Failed to update the deployments ['Replica'].")
    verdict = status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(degraded)), "gptj")
    assert not verdict.ready and "DEPLOY_FAILED" in verdict.reason and "Replica UNHEALTHY: The replica's constructor raised" in verdict.reason
    assert status_mod.readiness(status_mod.parse_rayservice(rayservice_with_status(LEGACY_RUNNING)), "gptj").ready


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


# -- the commands against fake clusters -----------------------------------------------------------


def test_apply_sends_server_side_apply_requests(use_cluster, capsys):
    cluster = use_cluster(fake_cluster())
    assert cli.main(["apply", "-n", NS, *FILLED]) == 0
    writes = cluster.custom.writes
    assert [(w[4], w[5]) for w in writes] == [("rayservices", "gptj"), ("gateways", "gptj"), ("httproutes", "gptj"),
                                              ("healthcheckpolicies", "gptj-serve"), ("gcpbackendpolicies", "gptj-serve"),
                                              ("podmonitorings", "gptj-ray")]
    for write in writes:
        assert write[7] == {"field_manager": "gptj-kuberay", "force": True, "_content_type": "application/apply-patch+yaml"}
    assert [w[1] for w in cluster.core.writes] == ["gptj-head", "gptj-worker"]
    assert cluster.core.selectors == ["cloud.google.com/gke-tpu-accelerator=tpu-v5-lite-podslice,cloud.google.com/gke-tpu-topology=2x2"]
    body = writes[0][6]
    assert "gs://my-bucket/gptj-6b-native" in body["spec"]["serveConfigV2"]
    assert "applied RayService gptj/gptj" in capsys.readouterr().out


def test_apply_refuses_placeholders(use_cluster, capsys):
    use_cluster(fake_cluster())
    assert cli.main(["apply", "-n", NS]) == 2
    err = capsys.readouterr().err
    assert "placeholders" in err and "--checkpoint" in err and "--image" in err


def test_apply_without_kuberay_crd(use_cluster, capsys):
    cluster = use_cluster(fake_cluster(installed=ALL_CRDS - {"rayservices.ray.io"}))
    assert cli.main(["apply", "-n", NS, *FILLED]) == 2
    err = capsys.readouterr().err
    assert "rayservices.ray.io" in err and "helm install kuberay-operator" in err
    assert cluster.custom.writes == [] and cluster.core.writes == []


def test_apply_without_tpu_nodes(use_cluster, capsys):
    cluster = use_cluster(fake_cluster(node_labels=[{"cloud.google.com/gke-nodepool": "default-pool"}]))
    assert cli.main(["apply", "-n", NS, *FILLED]) == 2
    err = capsys.readouterr().err
    assert "no node in the cluster has the TPU worker group's labels" in err and "ct5lp-hightpu-4t" in err
    assert cluster.custom.writes == []
    assert cli.main(["apply", "-n", NS, *FILLED, "--skip-tpu-check"]) == 0


def test_reapply_with_changed_cluster_config_needs_recreate(use_cluster, capsys):
    cluster = use_cluster(fake_cluster())
    assert cli.main(["apply", "-n", NS, *FILLED]) == 0
    assert cli.main(["apply", "-n", NS, *FILLED]) == 0, "an unchanged re-apply goes through"
    changed = ["--checkpoint", "gs://my-bucket/gptj-6b-native", "--image", "us-docker.pkg.dev/p/gptj/gptj-serve:v2"]
    capsys.readouterr()
    assert cli.main(["apply", "-n", NS, *changed]) == 2
    assert "--recreate" in capsys.readouterr().err
    assert cli.main(["apply", "-n", NS, *changed, "--recreate"]) == 0
    assert ("delete", "rayservices", NS, "gptj") in cluster.custom.writes


def test_status_and_wait(use_cluster, capsys):
    use_cluster(fake_cluster({("rayservices", NS, "gptj"): rayservice_with_status(READY)}))
    assert cli.main(["status", "-n", NS]) == 0
    out = capsys.readouterr().out
    assert "condition Ready=True reason=NonZeroServeEndpoints" in out and "Replica: UPSCALING" in out and "READY" in out
    assert cli.main(["status", "-n", NS, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ready"] is True and report["apps"][0]["name"] == "gptj"
    assert cli.main(["wait", "-n", NS, "--timeout", "1"]) == 0

    use_cluster(fake_cluster({("rayservices", NS, "gptj"): rayservice_with_status(TIMED_OUT)}))
    assert cli.main(["status", "-n", NS]) == 1
    assert cli.main(["wait", "-n", NS, "--timeout", "5"]) == 2
    assert "gave up initializing" in capsys.readouterr().err

    use_cluster(fake_cluster())
    assert cli.main(["status", "-n", NS]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_wait_until_ready_polls_and_times_out():
    sequence = iter([INITIALIZING, INITIALIZING, READY])
    now = [0.0]
    messages = []
    result = cluster_mod.wait_until_ready(
        lambda: status_mod.parse_rayservice(rayservice_with_status(next(sequence))), "gptj", timeout_s=100,
        poll_s=10, report=messages.append, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert result.app("gptj").status == "RUNNING" and now[0] == 20
    assert len(messages) == 2 and messages[0].startswith("waiting: Ready=False") and messages[1].startswith("ready:")

    now[0] = 0.0
    with pytest.raises(DeployError, match=r"not ready after 30s.*Initializing"):
        cluster_mod.wait_until_ready(
            lambda: status_mod.parse_rayservice(rayservice_with_status(INITIALIZING)), "gptj", timeout_s=30,
            poll_s=10, report=lambda _: None, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))


PROGRAMMED_GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "gptj", "namespace": NS},
    "spec": {"gatewayClassName": "gke-l7-global-external-managed", "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]},
    "status": {"addresses": [{"type": "IPAddress", "value": "34.117.10.20"}],
               "conditions": [condition("Programmed", "True", "Programmed", "")]}}


def test_gateway_payload_follows_the_crd_schema():
    assert schemas.errors(PROGRAMMED_GATEWAY) == []


def test_endpoint(use_cluster, capsys):
    use_cluster(fake_cluster({("gateways", NS, "gptj"): PROGRAMMED_GATEWAY}))
    assert cli.main(["endpoint", "-n", NS]) == 0
    assert capsys.readouterr().out.strip() == "http://34.117.10.20"
    use_cluster(fake_cluster())
    assert cli.main(["endpoint", "-n", NS]) == 1
    assert cli.main(["endpoint", "-n", NS, "--overlay", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "http://gptj-serve-svc.gptj.svc.cluster.local:8000"


def test_delete_tolerates_missing_objects(use_cluster, capsys):
    cluster = use_cluster(fake_cluster({("rayservices", NS, "gptj"): {"kind": "RayService"}}))
    assert cli.main(["delete", "-n", NS]) == 0
    out = capsys.readouterr().out
    assert "deleted: RayService gptj/gptj" in out and "already absent: Gateway gptj/gptj" in out
    assert ("delete", "gptj-head", NS) in cluster.core.writes


def test_forbidden_is_explained():
    class Forbidden(FakeExtensions):
        def read_custom_resource_definition(self, name):
            raise ApiException(status=403, reason="Forbidden")

    cluster = Cluster(FakeCustomObjects(), FakeCore(), Forbidden(), NS)
    with pytest.raises(DeployError, match="not allowed.*get-credentials"):
        cluster.preflight(render.render_overlay("cpu").objects)


# -- errors from the real client ------------------------------------------------------------------


def use_kubeconfig(monkeypatch, path) -> None:
    """Point the client at `path`; it reads KUBECONFIG once, at import."""
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


def test_no_kubeconfig(monkeypatch, tmp_path, capsys):
    use_kubeconfig(monkeypatch, tmp_path / "missing")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["status", "-n", NS]) == 2
    err = capsys.readouterr().err
    assert "no Kubernetes configuration found" in err and "get-credentials" in err


def test_unreachable_api_server(monkeypatch, tmp_path, capsys):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u", "namespace": NS}}]}))
    use_kubeconfig(monkeypatch, kubeconfig)
    assert cluster_mod.connect().default_namespace == NS
    assert cli.main(["apply", *FILLED]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Kubernetes API server" in err and "127.0.0.1:9" in err


def test_unexpected_api_error_is_reported(use_cluster, capsys):
    class Broken(FakeCore):
        def list_node(self, label_selector=""):
            e = ApiException(status=500, reason="Internal Server Error")
            e.body = json.dumps({"kind": "Status", "message": "etcdserver: request timed out", "code": 500})
            raise e

    use_cluster(Cluster(FakeCustomObjects(), Broken(), FakeExtensions(), NS))
    assert cli.main(["apply", "-n", NS, *FILLED]) == 2
    assert "answered 500: etcdserver: request timed out" in capsys.readouterr().err


def test_render_command(capsys):
    assert cli.main(["render", "--check"]) == 0
    assert cli.main(["render", "--stdout", "--overlay", "gke-tpu", *FILLED]) == 0
    printed = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert render.find_placeholders(printed) == [] and {o["kind"] for o in printed} >= {"RayService", "Gateway"}
    assert cli.main(["render", "--stdout"]) == 2
    assert cli.main(["render", "--image", "x:1"]) == 2
    assert "go with --stdout" in capsys.readouterr().err
