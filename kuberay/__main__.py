"""The deploy tool: `python -m kuberay COMMAND`.

  render    write the generated manifests (serveConfigV2 patch + rendered/<overlay>.yaml) from
            serve_config.yaml; --check fails when the committed ones drift; --stdout prints one
  apply     check the cluster (CRDs, TPU nodes), then server-side apply the overlay
  status    the RayService's conditions, per-application and per-deployment Serve status, endpoints
  wait      block until the RayService serves the application (or time out)
  endpoint  the URL clients use: the Gateway's address, or the in-cluster Serve Service
  delete    delete what `apply` created

Exit status: 0 done, 1 not ready / drift found, 2 an error (the message says what to do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from kuberay import render
from kuberay import status as status_mod
from kuberay.cluster import (Cluster, DeployError, api_message, apply_requests, cluster_change, connect, delete_requests,
                             wait_until_ready)


def _rendered(overlay: str, checkpoint: str | None = None, image: str | None = None) -> render.Rendered:
    """The overlay's objects; `checkpoint` and `image` (render --stdout and apply take them) fill its placeholders."""
    return render.render_overlay(overlay, args={"checkpoint": checkpoint} if checkpoint else None, image=image)


def _rayservice(rendered: render.Rendered) -> dict:
    return next(o for o in rendered.objects if o["kind"] == "RayService")


def _connect(args: argparse.Namespace) -> tuple[Cluster, str]:
    cluster = connect(args.context)
    return cluster, args.namespace or cluster.default_namespace


def cmd_render(args: argparse.Namespace) -> int:
    overlays = render.OVERLAYS if args.overlay == "all" else (args.overlay,)
    if (args.image or args.checkpoint) and not args.stdout:
        raise DeployError("--image and --checkpoint go with --stdout: the committed files keep the placeholders")
    if args.stdout:
        if len(overlays) != 1:
            raise DeployError("--stdout prints one overlay: pass --overlay gke-tpu or --overlay cpu")
        sys.stdout.write(_rendered(args.overlay, args.checkpoint, args.image).manifest_text)
        return 0
    if args.check:
        drift = [path for overlay in overlays for path in render.drifted(overlay)]
        for path in drift:
            print(f"drift: {path.relative_to(render.REPO_ROOT)} differs from a fresh render", file=sys.stderr)
        if drift:
            print("run `python -m kuberay render` and commit the result", file=sys.stderr)
        return 1 if drift else 0
    for overlay in overlays:
        for path in render.write(overlay):
            print(f"wrote {path.relative_to(render.REPO_ROOT)}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    rendered = _rendered(args.overlay, args.checkpoint, args.image)
    placeholders = render.find_placeholders(rendered.objects)
    if args.dry_run:
        for message in placeholders:
            print(f"warning: {message}", file=sys.stderr)
        namespace = args.namespace or "default"
        for request in apply_requests(rendered.objects, namespace):
            print(f"would apply {request.kind} {namespace}/{request.name}")
        return 0
    if placeholders:
        raise DeployError("the manifest still has placeholders:\n  " + "\n  ".join(placeholders))
    cluster, namespace = _connect(args)
    cluster.preflight(rendered.objects, check_tpu_nodes=not args.skip_tpu_check)
    requests = apply_requests(rendered.objects, namespace)
    for request in (r for r in requests if r.kind == "RayService"):
        reason = cluster_change(cluster.get(request.kind, request.name, namespace), request)
        if reason and not args.recreate:
            raise DeployError(reason)
        if reason:
            print(f"recreating RayService {namespace}/{request.name} (--recreate)")
            cluster.delete(request)
            _wait_deleted(cluster, request.kind, request.name, namespace, timeout_s=600)
    for request in requests:
        cluster.apply(request)
        print(f"applied {request.kind} {namespace}/{request.name}")
    if args.wait:
        name = _rayservice(rendered)["metadata"]["name"]
        wait_until_ready(lambda: cluster.rayservice_status(name, namespace), render.APP_NAME, args.timeout)
    return 0


def _wait_deleted(cluster: Cluster, kind: str, name: str, namespace: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while cluster.get(kind, name, namespace) is not None:
        if time.monotonic() > end:
            raise DeployError(f"{kind} {namespace}/{name} still exists {timeout_s:.0f}s after deletion")
        time.sleep(5)


def cmd_status(args: argparse.Namespace) -> int:
    cluster, namespace = _connect(args)
    current = cluster.rayservice_status(_rayservice(_rendered(args.overlay))["metadata"]["name"], namespace)
    verdict = status_mod.readiness(current, render.APP_NAME)
    if args.json:
        print(json.dumps({**status_mod.status_dict(current), "ready": verdict.ready, "reason": verdict.reason},
                         indent=2))
    else:
        print(status_mod.format_status(current))
        print(f"{'READY' if verdict.ready else 'NOT READY'}: {verdict.reason}")
    return 0 if verdict.ready else 1


def cmd_wait(args: argparse.Namespace) -> int:
    cluster, namespace = _connect(args)
    name = _rayservice(_rendered(args.overlay))["metadata"]["name"]
    wait_until_ready(lambda: cluster.rayservice_status(name, namespace), render.APP_NAME, args.timeout,
                     poll_s=args.interval)
    return 0


def cmd_endpoint(args: argparse.Namespace) -> int:
    cluster, namespace = _connect(args)
    rendered = _rendered(args.overlay)
    gateway = next((o for o in rendered.objects if o["kind"] == "Gateway"), None)
    if gateway is None:
        name = _rayservice(rendered)["metadata"]["name"]
        print(status_mod.serve_service_url(name, namespace))
        print(f"from outside the cluster: kubectl -n {namespace} port-forward svc/{name}-serve-svc 8000:8000 "
              "and use http://127.0.0.1:8000", file=sys.stderr)
        return 0
    live = cluster.get("Gateway", gateway["metadata"]["name"], namespace)
    url = status_mod.gateway_url(live) if live else None
    if url is None:
        print(f"Gateway {namespace}/{gateway['metadata']['name']} has no programmed address yet "
              "(a new GKE load balancer takes a few minutes)", file=sys.stderr)
        return 1
    print(url)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    cluster, namespace = _connect(args)
    for request in delete_requests(_rendered(args.overlay).objects, namespace):
        gone = cluster.delete(request)
        print(f"{'deleted' if gone else 'already absent'}: {request.kind} {namespace}/{request.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kuberay", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_: str, overlays: tuple[str, ...] = render.OVERLAYS) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        p.add_argument("--overlay", choices=overlays, default="gke-tpu", help="which overlay (default gke-tpu)")
        return p

    def add_cluster(p: argparse.ArgumentParser) -> None:
        p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's)")
        p.add_argument("--context", help="kubeconfig context (default: the current one)")

    def add_values(p: argparse.ArgumentParser) -> None:
        p.add_argument("--image", help="container image for the Ray pods (replaces the overlay's)")
        p.add_argument("--checkpoint", help="checkpoint for the model, e.g. gs://BUCKET/gptj-6b-native")

    p = add("render", cmd_render, "write (or --check) the generated manifests", (*render.OVERLAYS, "all"))
    p.set_defaults(overlay="all")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed files drift from a fresh render")
    p.add_argument("--stdout", action="store_true", help="print one overlay's manifest instead of writing files")
    add_values(p)

    p = add("apply", cmd_apply, "check the cluster, then apply the overlay")
    add_cluster(p)
    add_values(p)
    p.add_argument("--recreate", action="store_true",
                   help="delete and recreate the RayService when its cluster config changed (downtime)")
    p.add_argument("--skip-tpu-check", action="store_true",
                   help="apply even if no TPU node exists yet (pool scaled to zero, node auto-provisioning)")
    p.add_argument("--dry-run", action="store_true", help="print what would be applied; contact no cluster")
    p.add_argument("--wait", action="store_true", help="then wait until the application serves")
    p.add_argument("--timeout", type=float, default=1800, help="--wait limit in seconds (default 1800)")

    p = add("status", cmd_status, "RayService conditions, Serve application and deployment status")
    add_cluster(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("wait", cmd_wait, "wait until the application serves")
    add_cluster(p)
    p.add_argument("--timeout", type=float, default=1800, help="seconds (default 1800)")
    p.add_argument("--interval", type=float, default=10, help="seconds between polls (default 10)")

    add_cluster(add("endpoint", cmd_endpoint, "print the URL clients use"))
    add_cluster(add("delete", cmd_delete, "delete the overlay's objects"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from kubernetes.client.exceptions import ApiException

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DeployError, render.RenderError) as e:
        print(f"error: {e}", file=sys.stderr)
    except ApiException as e:  # one the commands did not expect: say what the API server said
        print(f"error: the Kubernetes API server answered {e.status}: {api_message(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
