"""The deploy tool's side that talks to the Kubernetes API server (official `kubernetes` client).

Two layers, so everything but the HTTP calls is tested without a cluster:
- pure functions turn rendered objects into requests (`apply_requests`, `delete_requests`) and
  into the checks to run first (`required_crds`, `tpu_node_selectors`, `cluster_change`);
- `Cluster` wraps the client's API objects (CustomObjectsApi, CoreV1Api, ApiextensionsV1Api),
  sends the requests, and turns every API failure into a `DeployError` that says what to do.

Objects are applied with server-side apply (field manager `gptj-kuberay`), so a re-apply changes
only what the manifests own and leaves alone what KubeRay and the Ray autoscaler write (status, the
worker group's replica count on the RayCluster).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from typing import Any, Callable

from kuberay import status as status_mod

FIELD_MANAGER = "gptj-kuberay"
# A hash of spec.rayClusterConfig as last applied; see cluster_change.
CLUSTER_CONFIG_HASH = "gptj.serve/ray-cluster-config-hash"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"


class DeployError(Exception):
    """A failure the user can act on; the message says what happened and what to do."""


@dataclasses.dataclass(frozen=True)
class Kind:
    group: str  # "" for the core API group
    version: str
    plural: str
    missing_hint: str = ""

    @property
    def crd(self) -> str | None:
        return f"{self.plural}.{self.group}" if self.group else None


KINDS = {
    "ServiceAccount": Kind("", "v1", "serviceaccounts"),
    "RayService": Kind("ray.io", "v1", "rayservices",
                       "install the KubeRay operator (docs/GKE.md, 'KubeRay operator'): "
                       "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0"),
    "Gateway": Kind("gateway.networking.k8s.io", "v1", "gateways",
                    "enable the Gateway API: gcloud container clusters update CLUSTER --gateway-api=standard"),
    "HTTPRoute": Kind("gateway.networking.k8s.io", "v1", "httproutes",
                      "enable the Gateway API: gcloud container clusters update CLUSTER --gateway-api=standard"),
    "HealthCheckPolicy": Kind("networking.gke.io", "v1", "healthcheckpolicies",
                              "GKE installs it with the Gateway API (--gateway-api=standard)"),
    "GCPBackendPolicy": Kind("networking.gke.io", "v1", "gcpbackendpolicies",
                             "GKE installs it with the Gateway API (--gateway-api=standard)"),
    "PodMonitoring": Kind("monitoring.googleapis.com", "v1", "podmonitorings",
                          "enable Managed Prometheus: gcloud container clusters update CLUSTER --enable-managed-prometheus"),
}


@dataclasses.dataclass(frozen=True)
class Request:
    """One object to apply or delete."""

    kind: str
    namespace: str
    name: str
    body: dict

    @property
    def api(self) -> Kind:
        return KINDS[self.kind]


# ---------------------------------------------------------------------------------------------
# Pure: requests and checks from rendered objects.


def cluster_config_hash(rayservice: dict) -> str:
    """A short hash of spec.rayClusterConfig: the part upgradeStrategy None does not roll out."""
    canonical = json.dumps(rayservice["spec"]["rayClusterConfig"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def apply_requests(objects: list[dict], namespace: str) -> list[Request]:
    """Server-side-apply requests for `objects`, in order, placed in `namespace`; the RayService
    carries the hash of its rayClusterConfig so the next apply can tell what changed."""
    requests = []
    for obj in objects:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
        if kind not in KINDS:
            raise DeployError(f"the manifest has a {kind} ({name}); the deploy tool knows only {sorted(KINDS)}")
        body = copy.deepcopy(obj)
        body["metadata"]["namespace"] = namespace
        if kind == "RayService":
            body["metadata"].setdefault("annotations", {})[CLUSTER_CONFIG_HASH] = cluster_config_hash(body)
        requests.append(Request(kind, namespace, name, body))
    return requests


def delete_requests(objects: list[dict], namespace: str) -> list[Request]:
    """Deletion in reverse apply order (routes before the Gateway, the RayService before its accounts)."""
    return list(reversed(apply_requests(objects, namespace)))


def required_crds(objects: list[dict]) -> list[str]:
    """CRD names (`plural.group`) the objects need, in first-use order."""
    names = [KINDS[o["kind"]].crd for o in objects if o.get("kind") in KINDS]
    return list(dict.fromkeys(n for n in names if n))


def tpu_node_selectors(objects: list[dict]) -> list[dict[str, str]]:
    """The nodeSelector of every RayService worker group whose Ray container asks for google.com/tpu."""
    selectors = []
    for obj in objects:
        if obj.get("kind") != "RayService":
            continue
        for group in obj["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
            pod = group["template"]["spec"]
            limits = pod["containers"][0].get("resources", {}).get("limits", {})
            if "google.com/tpu" in limits:
                selectors.append(dict(pod.get("nodeSelector", {})))
    return selectors


def cluster_change(live: dict | None, desired: Request) -> str | None:
    """Why applying `desired` over `live` would not take effect, or None when it would.

    With upgradeStrategy None, KubeRay applies serveConfigV2 changes in place but ignores changes to
    rayClusterConfig (image, pods); only deleting and recreating the RayService rolls them out."""
    if live is None or desired.kind != "RayService":
        return None
    if (desired.body["spec"].get("upgradeStrategy") or {}).get("type") != "None":
        return None
    before = (live.get("metadata", {}).get("annotations") or {}).get(CLUSTER_CONFIG_HASH)
    after = desired.body["metadata"]["annotations"][CLUSTER_CONFIG_HASH]
    if before == after:
        return None
    return (f"RayService {desired.namespace}/{desired.name}: rayClusterConfig changed (hash {before} -> {after}), "
            "and with upgradeStrategy None KubeRay does not roll that out. Rerun with --recreate to delete "
            "and recreate the RayService (downtime until a TPU host has loaded the model again), or revert "
            "the cluster change and apply only Serve config changes, which update in place.")


# ---------------------------------------------------------------------------------------------
# The cluster.


def api_message(e: Exception) -> str:
    """The API server's own message from an ApiException body, else the exception text."""
    body = getattr(e, "body", None)
    try:
        return json.loads(body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{getattr(e, 'status', '')} {getattr(e, 'reason', '') or e}".strip()


class Cluster:
    """The API calls the deploy tool makes, with errors turned into DeployError."""

    def __init__(self, custom: Any, core: Any, extensions: Any, default_namespace: str = "default"):
        self.custom, self.core, self.extensions = custom, core, extensions
        self.default_namespace = default_namespace

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status in (401, 403):
                raise DeployError(f"{what}: not allowed ({api_message(e)}); check your credentials "
                                  "(gcloud container clusters get-credentials ...) and RBAC") from e
            raise
        except HTTPError as e:
            configuration = getattr(getattr(self.custom, "api_client", None), "configuration", None)
            where = f" at {configuration.host}" if configuration is not None else ""
            raise DeployError(f"{what}: cannot reach the Kubernetes API server{where} ({e})") from e

    # -- checks --------------------------------------------------------------------------------

    def missing_crds(self, names: list[str]) -> list[str]:
        from kubernetes.client.exceptions import ApiException

        missing = []
        for name in names:
            try:
                self._call(f"read CRD {name}", self.extensions.read_custom_resource_definition, name)
            except ApiException as e:
                if e.status != 404:
                    raise DeployError(f"read CRD {name}: {api_message(e)}") from e
                missing.append(name)
        return missing

    def count_nodes(self, selector: dict[str, str]) -> int:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        nodes = self._call("list nodes", self.core.list_node, label_selector=label_selector)
        return len(nodes.items)

    def preflight(self, objects: list[dict], check_tpu_nodes: bool = True) -> None:
        """Refuse to apply into a cluster that cannot run `objects`: a CRD is missing, or the
        RayService wants TPU hosts and no node carries their labels."""
        missing = self.missing_crds(required_crds(objects))
        if missing:
            by_crd = {k.crd: k for k in KINDS.values()}
            hints = "\n".join(f"  - {name}: {by_crd[name].missing_hint}" for name in missing)
            raise DeployError(f"the cluster lacks CustomResourceDefinitions the manifests need:\n{hints}")
        if not check_tpu_nodes:
            return
        for selector in tpu_node_selectors(objects):
            if self.count_nodes(selector) == 0:
                labels = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
                raise DeployError(
                    f"no node in the cluster has the TPU worker group's labels ({labels}): create the "
                    "TPU v5e node pool (docs/GKE.md: gcloud container node-pools create ... "
                    "--machine-type=ct5lp-hightpu-4t --tpu-topology=2x2). If the pool exists but is "
                    "scaled to zero, or node auto-provisioning creates it, pass --skip-tpu-check.")

    # -- objects -------------------------------------------------------------------------------

    def get(self, kind: str, name: str, namespace: str) -> dict | None:
        """A custom object as a dict, or None when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        api = KINDS[kind]
        try:
            return self._call(f"get {kind} {namespace}/{name}", self.custom.get_namespaced_custom_object,
                              api.group, api.version, namespace, api.plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise DeployError(f"get {kind} {namespace}/{name}: {api_message(e)}") from e

    def apply(self, request: Request) -> None:
        from kubernetes.client.exceptions import ApiException

        api = request.api
        what = f"apply {request.kind} {request.namespace}/{request.name}"
        options = dict(field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_CONTENT_TYPE)
        try:
            if not api.group:
                self._call(what, self.core.patch_namespaced_service_account,
                           request.name, request.namespace, request.body, **options)
            else:
                self._call(what, self.custom.patch_namespaced_custom_object, api.group, api.version,
                           request.namespace, api.plural, request.name, request.body, **options)
        except ApiException as e:
            hint = (f" (does namespace {request.namespace} exist? kubectl create namespace {request.namespace})"
                    if e.status == 404 else "")
            raise DeployError(f"{what}: {api_message(e)}{hint}") from e

    def delete(self, request: Request) -> bool:
        """Delete one object; False when it was already gone."""
        from kubernetes.client.exceptions import ApiException

        api = request.api
        what = f"delete {request.kind} {request.namespace}/{request.name}"
        try:
            if not api.group:
                self._call(what, self.core.delete_namespaced_service_account, request.name, request.namespace)
            else:
                self._call(what, self.custom.delete_namespaced_custom_object, api.group, api.version,
                           request.namespace, api.plural, request.name)
        except ApiException as e:
            if e.status == 404:
                return False
            raise DeployError(f"{what}: {api_message(e)}") from e
        return True

    def rayservice_status(self, name: str, namespace: str) -> status_mod.ServiceStatus:
        obj = self.get("RayService", name, namespace)
        if obj is None:
            raise DeployError(f"RayService {namespace}/{name} does not exist; deploy it with `python -m kuberay apply`")
        return status_mod.parse_rayservice(obj)


def connect(context: str | None = None) -> Cluster:
    """A Cluster from the kubeconfig (KUBECONFIG or ~/.kube/config), else the in-cluster service
    account; its default namespace is the kubeconfig context's."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    namespace = "default"
    try:
        config.load_kube_config(context=context)
        _, active = config.list_kube_config_contexts()
        namespace = (active or {}).get("context", {}).get("namespace") or namespace
    except (ConfigException, FileNotFoundError) as kube_error:
        if context is not None:
            raise DeployError(f"kubeconfig context {context!r}: {kube_error}") from kube_error
        try:
            config.load_incluster_config()
        except ConfigException:
            raise DeployError(
                f"no Kubernetes configuration found ({kube_error}). Point KUBECONFIG at a kubeconfig, or "
                "fetch one for your GKE cluster: gcloud container clusters get-credentials CLUSTER "
                "--location LOCATION") from kube_error
    return Cluster(client.CustomObjectsApi(), client.CoreV1Api(), client.ApiextensionsV1Api(), namespace)


def wait_until_ready(get_status: Callable[[], status_mod.ServiceStatus], app: str, timeout_s: float,
                     poll_s: float = 10.0, report: Callable[[str], None] = print,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> status_mod.ServiceStatus:
    """Poll until the RayService serves `app`; report each new reason; DeployError on timeout or
    when KubeRay gives up."""
    end = clock() + timeout_s
    last_reason = None
    while True:
        current = get_status()
        verdict = status_mod.readiness(current, app)
        if verdict.ready:
            report(f"ready: {verdict.reason}")
            return current
        if verdict.failed:
            raise DeployError(f"RayService {current.namespace}/{current.name} failed: {verdict.reason}")
        if verdict.reason != last_reason:
            report(f"waiting: {verdict.reason}")
            last_reason = verdict.reason
        if clock() >= end:
            raise DeployError(f"RayService {current.namespace}/{current.name} not ready after {timeout_s:.0f}s: "
                              f"{verdict.reason}\n{status_mod.format_status(current)}")
        sleep(poll_s)
