"""Render the Helm chart k8s/avatarserve offline and validate what it renders (no cluster, no helm binary).

    from tests.k8s.render import render
    r = render("cpu")                      # values-cpu.yaml on top of the chart defaults
    r.serve_config                         # serveConfigV2, parsed (ServeDeploySchema as a dict)
    r.application, r.app_args              # the one Serve application and its args
    r.head_ray_resources                   # custom resources the head offers, e.g. {"avatarserve_ingress": 1000}

A local Ray cluster that runs `r.serve_config` must offer `r.head_ray_resources` (`ray start --resources` /
`ray.init(resources=...)`): the Gateway, SinkFrameCache and ops page are pinned to it. The proxies' ports are the
chart's (`serve.httpPort` 8000, `serve.grpcPort` 9000); pass `values={"serve": {"grpcPort": p, "httpPort": q}}` for
others. REDIS_URL (and REDIS_PASSWORD) come from the environment of every Ray process, as on Kubernetes.

Rendering uses the Helm Go SDK (helm-python-sdk: the same template engine, values coalescing and values-schema
validation as `helm template`). Validation helpers: kubernetes-validate for core kinds, the vendored CRD schemas
(tests/k8s/schemas, closed against unknown fields) for RayService and PodMonitor, Ray's ServeDeploySchema for
serveConfigV2.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "k8s" / "avatarserve"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

# profile -> (values file in the chart, the deploy file whose `app:` it carries)
PROFILES: Dict[str, tuple] = {
    "cpu": ("values-cpu.yaml", "deploy/local.yaml"),
    "single-gpu": ("values-single-gpu.yaml", "deploy/single-gpu.yaml"),
    "tpp-5gpu": ("values-tpp-5gpu.yaml", "deploy/tpp-5gpu.yaml"),
}
RELEASE = "avatarserve"
NAMESPACE = "avatarserve"
# Kubernetes versions the core objects are validated against: the chart's kubeVersion floor and the newest known.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
# KubeRay versions whose RayService CRD the RayService is validated against (>= 1.6 is required).
KUBERAY_CRDS = {"1.6.2": "kuberay-v1.6.2.rayservices.json", "1.7.0": "kuberay-v1.7.0.rayservices.json"}
PODMONITOR_CRD = "prometheus-operator-v0.93.0.podmonitors.json"
GPU = "nvidia.com/gpu"


def load_yaml(path: Path) -> Any:
    with open(path) as fh:
        return yaml.safe_load(fh)


def profile_values(profile: Optional[str]) -> Dict[str, Any]:
    """The values file of a profile (None: no profile, the chart defaults only)."""
    if profile is None:
        return {}
    return load_yaml(CHART / PROFILES[profile][0]) or {}


def deploy_app(profile: str) -> Dict[str, Any]:
    """The `app:` section of the deploy file a profile matches."""
    return load_yaml(REPO / PROFILES[profile][1])["app"]


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Dict[str, Any]:
    """Helm's coalescing of two values layers: maps merge deeply, anything else is replaced, null deletes."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@functools.lru_cache(maxsize=1)
def chart():
    import helm_python

    return helm_python.Chart.load(str(CHART))


@dataclass(frozen=True)
class Rendered:
    profile: Optional[str]
    values: Dict[str, Any]          # what was passed to Helm (profile + overrides)
    objects: List[Dict[str, Any]]   # every rendered Kubernetes object, in template order
    notes: str = ""
    files: Dict[str, str] = field(default_factory=dict, repr=False)

    def all(self, kind: str) -> List[Dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: Optional[str] = None) -> Dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} objects of kind {kind}" + (f" named {name}" if name else ""))
        return found[0]

    @property
    def kinds_and_names(self) -> List[str]:
        return [f"{o['kind']}/{o['metadata']['name']}" for o in self.objects]

    @property
    def rayservice(self) -> Dict[str, Any]:
        return self.get("RayService")

    @property
    def cluster(self) -> Dict[str, Any]:
        return self.rayservice["spec"]["rayClusterConfig"]

    @property
    def serve_config(self) -> Dict[str, Any]:
        """serveConfigV2, parsed."""
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    @property
    def application(self) -> Dict[str, Any]:
        (app,) = self.serve_config["applications"]
        return app

    @property
    def app_args(self) -> Dict[str, Any]:
        return self.application["args"]

    def groups(self) -> Dict[str, Dict[str, Any]]:
        """Ray groups by name: "head" and every worker group's groupName."""
        out = {"head": self.cluster["headGroupSpec"]}
        for g in self.cluster.get("workerGroupSpecs") or []:
            out[g["groupName"]] = g
        return out

    def container(self, group: str) -> Dict[str, Any]:
        return self.groups()[group]["template"]["spec"]["containers"][0]

    def ray_resources(self, group: str) -> Dict[str, int]:
        """Custom resources a group offers, parsed the way Ray's KubeRay autoscaler parses rayStartParams."""
        from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

        spec = self.groups()[group]
        return _get_custom_resources(spec.get("resources") or {}, spec.get("rayStartParams") or {}, group)

    @property
    def head_ray_resources(self) -> Dict[str, int]:
        return self.ray_resources("head")


def render(profile: Optional[str] = None, values: Optional[Mapping[str, Any]] = None, *, release: str = RELEASE,
           namespace: str = NAMESPACE) -> Rendered:
    """Render the chart with a profile's values file and `values` on top (as `helm template -f PROFILE --set ...`).
    Raises helm_python.HelmValuesError (values schema) or HelmRenderError (a template's `fail`)."""
    given = merge(profile_values(profile), values or {})
    files = chart().render(given, name=release, namespace=namespace, is_install=True)
    objects: List[Dict[str, Any]] = []
    notes = ""
    for path in sorted(files, key=_template_order):
        if path.endswith("NOTES.txt"):
            notes = files[path]
            continue
        for doc in yaml.safe_load_all(files[path]):
            if doc:
                objects.append(doc)
    return Rendered(profile=profile, values=given, objects=objects, notes=notes, files=files)


def _template_order(path: str) -> tuple:
    return (0 if path.endswith("rayservice.yaml") else 1, path)


# ------------------------------------------------------------------------------------------------ validation


def close_schema(node: Any) -> Any:
    """A copy of an OpenAPI schema where every object that lists `properties` (and does not keep unknown fields)
    rejects properties it does not list."""
    if isinstance(node, list):
        return [close_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: close_schema(v) for k, v in node.items()} if "properties" not in node else {
        k: ({p: close_schema(s) for p, s in v.items()} if k == "properties" else close_schema(v))
        for k, v in node.items()}
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(filename: str):
    import jsonschema

    with open(SCHEMAS / filename) as fh:
        schema = close_schema(json.load(fh))
    return jsonschema.Draft202012Validator(schema)


def crd_errors(obj: Mapping[str, Any], filename: str) -> List[str]:
    """Every violation of a (closed) CRD schema, as `path: message`."""
    errors = sorted(crd_validator(filename).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]


def core_errors(obj: Mapping[str, Any], version: str) -> List[str]:
    """kubernetes-validate in strict mode (unknown fields fail) for one Kubernetes version."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(obj), version, strict=True)
    except kubernetes_validate.ValidationError as exc:  # the first violation (its attributes are jsonschema's)
        return [f"{'.'.join(str(p) for p in exc.absolute_path)}: {exc.message}"]
    return []


def embedded_core_objects(r: Rendered) -> List[Dict[str, Any]]:
    """Core objects inside the RayService, as standalone objects kubernetes-validate checks: every group's pod
    template (PodTemplate) and the Serve Service."""
    out = []
    for name, group in r.groups().items():
        out.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{name}"},
                    "template": group["template"]})
    svc = copy.deepcopy(r.rayservice["spec"]["serveService"])
    out.append({"apiVersion": "v1", "kind": "Service", **svc})
    return out


def serve_config_errors(config: Mapping[str, Any]) -> List[str]:
    """Ray's ServeDeploySchema, plus unknown keys (that schema ignores extra keys on purpose, for forward
    compatibility; a key we write that this Ray does not know is a mistake)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema, HTTPOptionsSchema, gRPCOptionsSchema

    errors = []
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        errors += [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]

    def unknown(d: Mapping[str, Any], model, path: str) -> None:
        for k in set(d) - set(model.model_fields):
            errors.append(f"{path}{k}: not a field of {model.__name__}")

    unknown(config, ServeDeploySchema, "")
    unknown(config.get("http_options") or {}, HTTPOptionsSchema, "http_options.")
    unknown(config.get("grpc_options") or {}, gRPCOptionsSchema, "grpc_options.")
    for i, app in enumerate(config.get("applications") or []):
        unknown(app, ServeApplicationSchema, f"applications.{i}.")
    return errors


def validation_errors(r: Rendered) -> Dict[str, List[str]]:
    """Every problem of every rendered object, by `Kind/name` (empty lists: valid)."""
    out: Dict[str, List[str]] = {}
    for obj in r.objects:
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "RayService":
            errs = []
            for version, filename in KUBERAY_CRDS.items():
                errs += [f"[KubeRay {version} CRD] {e}" for e in crd_errors(obj, filename)]
            errs += [f"[serveConfigV2] {e}" for e in serve_config_errors(r.serve_config)]
            out[key] = errs
        elif obj["kind"] == "PodMonitor":
            out[key] = crd_errors(obj, PODMONITOR_CRD)
        else:
            out[key] = [f"[k8s {v}] {e}" for v in KUBE_VERSIONS for e in core_errors(obj, v)]
    for obj in embedded_core_objects(r):
        key = f"RayService/{r.rayservice['metadata']['name']} {obj['kind']}/{obj['metadata']['name']}"
        out[key] = [f"[k8s {v}] {e}" for v in KUBE_VERSIONS for e in core_errors(obj, v)]
    return out
