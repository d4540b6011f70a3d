"""The deploy tool's commands (`python -m kuberay`, kuberay/__main__.py) against fake clusters, and
the errors the real kubernetes client raises without a reachable cluster."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from app.args import APP_NAME
from kuberay import __main__ as cli
from kuberay import cluster as cluster_mod
from kuberay import render
from kuberay.cluster import Cluster
from tests.kuberay.fakes import (ALL_CRDS, NS, PROGRAMMED_GATEWAY, READY, TIMED_OUT, FakeCore, FakeCustomObjects,
                                 FakeExtensions, fake_cluster, rayservice_with_status)


@pytest.fixture
def use_cluster(monkeypatch):
    """Make the CLI talk to a given fake Cluster."""
    def install(cluster: Cluster) -> Cluster:
        monkeypatch.setattr(cli, "connect", lambda context=None: cluster)
        return cluster
    return install


FILLED = ["--checkpoint", "gs://my-bucket/gptj-6b-native", "--image", "us-docker.pkg.dev/p/gptj/gptj-serve:v1"]


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
    assert report["ready"] is True and report["apps"][0]["name"] == APP_NAME
    assert cli.main(["wait", "-n", NS, "--timeout", "1"]) == 0

    use_cluster(fake_cluster({("rayservices", NS, "gptj"): rayservice_with_status(TIMED_OUT)}))
    assert cli.main(["status", "-n", NS]) == 1
    assert cli.main(["wait", "-n", NS, "--timeout", "5"]) == 2
    assert "gave up initializing" in capsys.readouterr().err

    use_cluster(fake_cluster())
    assert cli.main(["status", "-n", NS]) == 2
    assert "does not exist" in capsys.readouterr().err


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
