"""Read what KubeRay and the Gateway controller report, without talking to a cluster.

KubeRay (v1.3 and later) writes a RayService's state into `.status`:
- `conditions`: `Ready` (True once the Serve applications run and gptj-serve-svc has endpoints;
  reasons such as Initializing, InitializingTimeout, ZeroServeEndpoints, NonZeroServeEndpoints) and
  `UpgradeInProgress` (a pending cluster is being prepared), each with the `observedGeneration` it
  describes;
- `activeServiceStatus` (the cluster serving traffic) and `pendingServiceStatus` (one being prepared):
  `rayClusterName` and `applicationStatuses.<app>` = {status, message, serveDeploymentStatuses.<name>
  = {status, message}}, the statuses Serve itself reports (RUNNING, DEPLOYING, DEPLOY_FAILED, ... for
  applications; HEALTHY, UPDATING, UPSCALING, UNHEALTHY, ... for deployments);
- `numServeEndpoints`, `observedGeneration`, and the deprecated `serviceStatus` ("Running"), the only
  readiness signal before v1.3.

Everything here is a pure function of those dicts, so `status`, `wait` and `endpoint` are tested on
realistic payloads.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str
    observed_generation: int | None


@dataclasses.dataclass(frozen=True)
class DeploymentStatus:
    name: str
    status: str
    message: str


@dataclasses.dataclass(frozen=True)
class AppStatus:
    name: str
    status: str
    message: str
    deployments: tuple[DeploymentStatus, ...]


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """A RayService's status, flattened."""

    name: str
    namespace: str
    generation: int | None
    conditions: tuple[Condition, ...]
    num_serve_endpoints: int
    active_cluster: str | None
    pending_cluster: str | None
    apps: tuple[AppStatus, ...]
    pending_apps: tuple[AppStatus, ...]
    legacy_service_status: str | None

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def app(self, name: str) -> AppStatus | None:
        return next((a for a in self.apps if a.name == name), None)

    @property
    def upgrading(self) -> bool:
        cond = self.condition("UpgradeInProgress")
        return bool(cond and cond.status == "True") or self.pending_cluster is not None


def _apps(service_status: dict | None) -> tuple[AppStatus, ...]:
    apps = (service_status or {}).get("applicationStatuses") or {}
    return tuple(
        AppStatus(
            name=name,
            status=app.get("status", "UNKNOWN"),
            message=app.get("message", ""),
            deployments=tuple(
                DeploymentStatus(dep_name, dep.get("status", "UNKNOWN"), dep.get("message", ""))
                for dep_name, dep in sorted((app.get("serveDeploymentStatuses") or {}).items())
            ),
        )
        for name, app in sorted(apps.items())
    )


def parse_rayservice(obj: dict) -> ServiceStatus:
    """Flatten a RayService object (as the API server returns it) into a ServiceStatus."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    active, pending = status.get("activeServiceStatus") or {}, status.get("pendingServiceStatus") or {}
    return ServiceStatus(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        generation=meta.get("generation"),
        conditions=tuple(
            Condition(c.get("type", ""), c.get("status", "Unknown"), c.get("reason", ""), c.get("message", ""),
                      c.get("observedGeneration"))
            for c in status.get("conditions") or []
        ),
        num_serve_endpoints=int(status.get("numServeEndpoints") or 0),
        active_cluster=active.get("rayClusterName") or None,
        pending_cluster=pending.get("rayClusterName") or None,
        apps=_apps(active),
        pending_apps=_apps(pending),
        legacy_service_status=status.get("serviceStatus"),
    )


@dataclasses.dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str
    # True when KubeRay has given up (waiting longer cannot help).
    failed: bool = False


def readiness(status: ServiceStatus, app: str) -> Readiness:
    """Whether the RayService serves `app` now, and if not, the most useful reason why."""
    ready = status.condition("Ready")
    if ready is not None:
        if ready.reason == "InitializingTimeout":
            return Readiness(False, f"KubeRay gave up initializing: {ready.message}", failed=True)
        if status.generation is not None and ready.observed_generation not in (None, status.generation):
            return Readiness(False, f"KubeRay has not yet observed generation {status.generation} "
                                    f"(Ready describes generation {ready.observed_generation})")
        if ready.status != "True":
            return Readiness(False, _not_ready_detail(status, app, f"Ready={ready.status} ({ready.reason}: {ready.message})"))
    elif status.legacy_service_status != "Running":
        return Readiness(False, _not_ready_detail(status, app, f"serviceStatus={status.legacy_service_status!r}"))
    app_status = status.app(app)
    if app_status is None:
        return Readiness(False, f"application {app!r} is not in the active cluster's status yet")
    if app_status.status != "RUNNING":
        return Readiness(False, _not_ready_detail(status, app, f"application {app!r} is {app_status.status}"))
    if status.num_serve_endpoints < 1:
        return Readiness(False, "no pod is serving yet (numServeEndpoints=0)")
    return Readiness(True, f"application {app!r} RUNNING, {status.num_serve_endpoints} serve endpoint(s)")


def _not_ready_detail(status: ServiceStatus, app: str, headline: str) -> str:
    """Add what Serve says about the app and its unhealthy deployments to `headline`."""
    app_status = status.app(app)
    if app_status is None:
        return headline
    details = [f"{d.name} {d.status}" + (f": {d.message}" if d.message else "")
               for d in app_status.deployments if d.status != "HEALTHY"]
    if app_status.message:
        details.insert(0, app_status.message)
    return headline + ("; " + "; ".join(details) if details else "")


def format_status(status: ServiceStatus) -> str:
    """The human-readable report `python -m kuberay status` prints."""
    lines = [f"RayService {status.namespace}/{status.name} (generation {status.generation})"]
    for c in status.conditions:
        lines.append(f"  condition {c.type}={c.status} reason={c.reason}" + (f": {c.message}" if c.message else ""))
    if not status.conditions and status.legacy_service_status:
        lines.append(f"  serviceStatus={status.legacy_service_status}")
    lines.append(f"  serve endpoints: {status.num_serve_endpoints}")
    for label, cluster, apps in (("active", status.active_cluster, status.apps),
                                 ("pending", status.pending_cluster, status.pending_apps)):
        if cluster is None and not apps:
            continue
        lines.append(f"  {label} cluster: {cluster or '-'}")
        for app in apps:
            lines.append(f"    app {app.name}: {app.status}" + (f" ({app.message})" if app.message else ""))
            for dep in app.deployments:
                lines.append(f"      {dep.name}: {dep.status}" + (f" ({dep.message})" if dep.message else ""))
    return "\n".join(lines)


def status_dict(status: ServiceStatus) -> dict[str, Any]:
    """The same report as JSON-ready data (`status --json`)."""
    return dataclasses.asdict(status)


def serve_service_url(rayservice_name: str, namespace: str) -> str:
    """The in-cluster URL of KubeRay's Serve Service for a RayService (`<name>-serve-svc`:8000)."""
    return f"http://{rayservice_name}-serve-svc.{namespace}.svc.cluster.local:8000"


def gateway_url(gateway: dict) -> str | None:
    """`http://<address>[:port]` of a Gateway once its controller has programmed an address, else None."""
    status = gateway.get("status") or {}
    programmed = next((c for c in status.get("conditions") or [] if c.get("type") == "Programmed"), None)
    addresses = [a.get("value") for a in status.get("addresses") or [] if a.get("value")]
    if not addresses or (programmed is not None and programmed.get("status") != "True"):
        return None
    listener = (gateway.get("spec", {}).get("listeners") or [{}])[0]
    scheme = "https" if listener.get("protocol") == "HTTPS" else "http"
    port = listener.get("port")
    default_port = 443 if scheme == "https" else 80
    return f"{scheme}://{addresses[0]}" + ("" if port in (None, default_port) else f":{port}")
