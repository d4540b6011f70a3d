"""Security: an optional API key, configurable request limits, safe checkpoint loading, no remote
code, and nothing but the Serve port behind the Gateway.

- API key: an application of its own ("secured" at /secured) whose `api_key_env` names a variable the
  test cluster sets (tests/cluster.py), as the GKE head pod gets it from a Secret. The model routes
  and the stats answer 401 without the right bearer token; the health routes and the OpenAPI
  document stay open (probes and load balancers carry no key), and the document declares the scheme.
- Limits: the same app sets `max_tokens_limit`, a small `max_request_bytes` and a small
  `max_pending_requests`, and each is enforced with a 4xx that names it.
- Checkpoints: tests/model/ckpt/test_hf.py proves the loader's behaviour (safetensors by default;
  `pytorch_model.bin` only through `torch.load(weights_only=True)`, and a .bin that carries pickled
  code is refused: test_pytorch_bin_loads_with_weights_only, test_pickled_code_in_a_bin_is_refused).
  Here a scan of the source makes sure no other code path unpickles anything or runs remote code.
- Exposure: the rendered GKE manifests route only the Serve proxy's port 8000 through the Gateway,
  and wire the key from the Secret into the head container by name.
"""

from __future__ import annotations

import ast
import pathlib

import httpx
import openai
import pytest
import yaml

from app.args import AppArgs
from app.ingress import read_api_key
from kuberay import render
from tests.cluster import MODEL_NAME, REPO_ROOT, TEST_API_KEY, TEST_API_KEY_ENV
from tests.reliability.helpers import deploy

APP = "secured"
PROMPT = "The quick brown fox"
CODE_DIRS = ("model", "app", "kuberay", "bench", "tests")
SECURED_ARGS = AppArgs(
    model_name=MODEL_NAME, checkpoint="tiny", max_cache_len=128, prompt_buckets=(16,), prefill_batch_buckets=(1,),
    slots=2, batch_max_size=1, max_pending_requests=4, max_request_bytes=2048, max_tokens_limit=16,
    api_key_env=TEST_API_KEY_ENV,
)
KEY = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture(scope="module")
def secured(ray_cluster) -> str:
    from ray import serve

    deploy(APP, SECURED_ARGS)
    yield f"{ray_cluster}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(secured):
    with httpx.Client(base_url=secured, timeout=60) as c:
        yield c


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, **fields}


# -- the API key ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [("POST", "/v1/completions"), ("POST", "/generate"), ("GET", "/v1/models"),
                                         ("GET", "/v1/stats")])
@pytest.mark.parametrize("headers,says", [
    ({}, "missing api key"),
    ({"Authorization": "Bearer wrong-key"}, "invalid api key"),
    ({"Authorization": TEST_API_KEY}, "missing api key"),  # no scheme
    ({"Authorization": f"Basic {TEST_API_KEY}"}, "missing api key"),
], ids=["none", "wrong", "no scheme", "basic"])
def test_requests_without_the_key_get_401(client, method, path, headers, says):
    body = completion() if path == "/v1/completions" else {"model": MODEL_NAME, "query": PROMPT}
    r = client.request(method, path, json=body if method == "POST" else None, headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert says in error["message"].lower() and "authorization: bearer" in error["message"].lower()
    assert TEST_API_KEY not in r.text


def test_the_key_is_checked_before_the_body_is_read(client):
    """An unauthenticated client cannot make the server read (or parse) a large body."""
    r = client.post("/v1/completions", content=b"x" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_requests_with_the_key_are_served(client, secured):
    r = client.post("/v1/completions", json=completion(temperature=0, ignore_eos=True), headers=KEY)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    r = client.post("/generate", json={"model": MODEL_NAME, "query": PROMPT}, headers=KEY)
    assert r.status_code == 200
    assert client.get("/v1/models", headers=KEY).json()["data"][0]["id"] == MODEL_NAME
    assert client.get("/v1/stats", headers=KEY).status_code == 200
    sdk = openai.OpenAI(base_url=f"{secured}/v1", api_key=TEST_API_KEY, max_retries=0)
    done = sdk.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{secured}/v1", api_key="wrong", max_retries=0).models.list()


def test_health_routes_and_the_schema_stay_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and f"/{APP}/openapi.json" in docs.text  # Swagger UI, behind the route prefix
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    paths = document["paths"]
    protected = (("/v1/completions", "post"), ("/generate", "post"), ("/v1/models", "get"), ("/v1/stats", "get"))
    for path, method in protected:
        assert paths[path][method]["security"] == [{"bearer": []}]
        assert "401" in paths[path][method]["responses"]
    for path in ("/healthz", "/readyz"):
        assert "security" not in paths[path]["get"]


def test_a_missing_key_variable_stops_the_ingress_from_starting(monkeypatch):
    """Asked for a key that is not there, the ingress refuses to start rather than serve without one."""
    monkeypatch.delenv("GPTJ_NO_SUCH_KEY", raising=False)
    with pytest.raises(RuntimeError, match="GPTJ_NO_SUCH_KEY"):
        read_api_key("GPTJ_NO_SUCH_KEY")
    monkeypatch.setenv("GPTJ_NO_SUCH_KEY", "   ")
    with pytest.raises(RuntimeError, match="empty"):
        read_api_key("GPTJ_NO_SUCH_KEY")
    monkeypatch.setenv("GPTJ_NO_SUCH_KEY", " k3y \n")
    assert read_api_key("GPTJ_NO_SUCH_KEY") == "k3y"
    assert read_api_key(None) is None
    with pytest.raises(ValueError, match="api_key_env"):
        AppArgs(api_key_env="not a variable name")


# -- request limits ---------------------------------------------------------------------------------


def test_configured_limits_are_enforced_with_named_errors(client):
    r = client.post("/v1/completions", json=completion(max_tokens=17), headers=KEY)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "max_tokens_limit=16" in r.json()["error"]["message"]
    r = client.post("/generate", json={"model": MODEL_NAME, "query": PROMPT,
                                       "extra_inputs": {"per_example_max_decode_steps": 17}}, headers=KEY)
    assert r.status_code == 400 and "max_tokens_limit=16" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json=completion(prompt="x" * 3000), headers=KEY)
    assert r.status_code == 413 and "2048" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json=completion(prompt=["a", "b", "c"], n=2), headers=KEY)
    assert r.status_code == 400 and "6 completions; at most 4 per request" in r.json()["error"]["message"]


# -- source and manifests ---------------------------------------------------------------------------


def python_sources() -> list[pathlib.Path]:
    root = pathlib.Path(REPO_ROOT)
    return sorted(p for d in CODE_DIRS for p in (root / d).rglob("*.py"))


def test_no_remote_code_anywhere():
    """No code or config turns on Hugging Face's remote code execution (the name is split here so
    this file does not match itself)."""
    forbidden = "trust_remote" + "_code"
    root = pathlib.Path(REPO_ROOT)
    files = python_sources() + [p for p in root.rglob("*") if p.suffix in (".yaml", ".yml", ".toml", ".json")
                                and ".venv" not in p.parts and ".git" not in p.parts]
    files += [root / "Dockerfile", root / "Makefile"]
    assert len(files) > 50
    hits = [str(p.relative_to(root)) for p in files if p.is_file() and forbidden in p.read_text(errors="replace")]
    assert hits == []


def test_nothing_unpickles_a_checkpoint():
    """torch.load always with weights_only=True; no pickle/cloudpickle/joblib loads, no numpy
    allow_pickle, no yaml.load with a loader that builds arbitrary objects, in any of the project's code."""
    unsafe = []
    for path in python_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            call = f"{owner}.{node.func.attr}"
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno} {call}"
            if call == "torch.load":
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    unsafe.append(where)
            elif call in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
                          "dill.load", "dill.loads", "yaml.unsafe_load", "yaml.full_load"):
                unsafe.append(where)
            elif call == "yaml.load" and ("Loader" not in keywords or any(
                    name in ast.unparse(keywords["Loader"]) for name in ("Unsafe", "FullLoader", "yaml.Loader"))):
                unsafe.append(where)
            elif "allow_pickle" in keywords and not (isinstance(keywords["allow_pickle"], ast.Constant)
                                                     and keywords["allow_pickle"].value is False):
                unsafe.append(where)
    assert unsafe == []


def rendered(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((render.RENDERED / f"{overlay}.yaml").read_text()) if d]


@pytest.mark.parametrize("overlay", render.OVERLAYS)
def test_gateway_exposes_only_the_serve_port(overlay):
    """The dashboard (8265), GCS (6379), Ray client (10001) and metrics (8080) ports stay inside the
    cluster: the only route in is the HTTPRoute to the Serve proxy's Service on port 8000."""
    objects = rendered(overlay)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Service", "Ingress", "TCPRoute", "UDPRoute", "GRPCRoute", "TLSRoute"}, kinds
    rayservice = next(o for o in objects if o["kind"] == "RayService")
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    serve_service = f"{rayservice['metadata']['name']}-serve-svc"
    for route in (o for o in objects if o["kind"] == "HTTPRoute"):
        backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
        assert backends and all((b["kind"], b["name"], b["port"]) == ("Service", serve_service, 8000) for b in backends)
    for gateway in (o for o in objects if o["kind"] == "Gateway"):
        assert {listener["port"] for listener in gateway["spec"]["listeners"]} <= {80, 443}


def test_gke_head_gets_the_api_key_from_a_secret_by_name():
    objects = rendered("gke-tpu")
    rayservice = next(o for o in objects if o["kind"] == "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    args = AppArgs(**config["applications"][0]["args"])
    assert args.api_key_env
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    [entry] = [e for e in head["env"] if e["name"] == args.api_key_env]
    assert set(entry) == {"name", "valueFrom"}, "the key itself must never be in the manifest"
    assert entry["valueFrom"]["secretKeyRef"]["optional"] is False
    assert not any("secretKeyRef" in str(e) for e in head.get("envFrom", []))
    cpu_args = AppArgs(**yaml.safe_load(next(o for o in rendered("cpu") if o["kind"] == "RayService")
                                        ["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert cpu_args.api_key_env is None, "the test-cluster overlay runs without a key, like local runs"
