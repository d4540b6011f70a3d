"""The CRD schemas the manifests are validated against, made strict.

The CRDs are vendored unchanged in tests/kuberay/crds/ (RayService from KubeRay v1.7.0, Gateway and
HTTPRoute from the Gateway API standard channel; its README names each file's source). A CRD schema leaves
unknown fields open (the API server prunes them, or rejects them under `kubectl apply
--validate=strict`), so a misspelt field would pass plain jsonschema validation: `strict` closes every
object that lists its properties, the way strict field validation does.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parent / "crds"
CRD_FILES = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway.networking.k8s.io_gateways.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.yaml",
}


def strict(schema: dict) -> dict:
    """A copy of `schema` where every object with `properties` refuses other keys."""
    out = {}
    for key, value in schema.items():
        if key == "properties":  # a mapping of field name -> schema, not a schema itself
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif isinstance(value, dict):
            out[key] = strict(value)
        elif isinstance(value, list):
            out[key] = [strict(v) if isinstance(v, dict) else v for v in value]
        else:
            out[key] = value
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the RayService CRD is 18k lines
    crd = yaml.load((CRDS / CRD_FILES[(api_version, kind)]).read_text(), Loader=loader)
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))


def errors(obj: dict) -> list[str]:
    """Every schema violation of `obj`, as `path: message`."""
    found = validator(obj["apiVersion"], obj["kind"]).iter_errors(obj)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]
