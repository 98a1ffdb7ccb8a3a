#!/usr/bin/env python3
"""Write the Helm chart's values schema, k8s/avatarserve/values.schema.json.

    python scripts/gen_chart_schema.py            # (re)generate it
    python scripts/gen_chart_schema.py --check    # exit 1 if the committed file is stale

Two parts, one file:
- the chart's own keys (image, head, worker groups, placement, dataPlane, serve, redis, monitoring, ...), written
  below; every mapping the chart defines is closed (`additionalProperties: false`), so a misspelled key fails
  `helm install` / `helm template` instead of being ignored. Kubernetes objects passed through verbatim
  (resources, tolerations, affinity, volumes, ...) are only typed here: the API server (and tests/k8s, against the
  CRDs and kubernetes-validate) checks their insides.
- `app:`, generated from `AppConfig` (services/avatarserve/serve/config.py), so the chart accepts exactly the keys
  and types of a deploy file's `app:` section. Its `$defs` are prefixed `app.`. Cross-field rules (validators)
  are not expressible here; tests/k8s parses every profile's rendered args with `AppConfig.parse`.

Helm validates values against this file before rendering (JSON Schema 2020-12).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO_ROOT / "k8s" / "avatarserve" / "values.schema.json"
APP_PREFIX = "app."


def _closed(properties: Dict[str, Any], **extra: Any) -> Dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties, **extra}


STR = {"type": "string"}
BOOL = {"type": "boolean"}
OBJ = {"type": "object"}
LIST_OF_OBJ = {"type": "array", "items": {"type": "object"}}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
REPLICAS = {"type": "integer", "minimum": 0}


def _ray_group(worker: bool) -> Dict[str, Any]:
    """The keys of KubeRay's ray-cluster chart for one group (head or worker), plus `rayResources`."""
    props: Dict[str, Any] = {
        "rayStartParams": {
            "type": "object", "description": "`ray start` parameters; values are strings (KubeRay convention).",
            "additionalProperties": {"type": "string"},  # `resources` is refused by the template: rayResources
        },
        "rayResources": {
            "type": "object", "description": "Ray custom resources this group offers (integer amounts).",
            "additionalProperties": {"type": "integer", "minimum": 0},
        },
        "image": _closed({"repository": STR, "tag": STR, "pullPolicy": {"$ref": "#/$defs/pullPolicy"}}),
        "labels": STR_MAP,
        "annotations": STR_MAP,
        "containerEnv": LIST_OF_OBJ,
        "envFrom": LIST_OF_OBJ,
        "resources": {"$ref": "#/$defs/resources"},
        "nodeSelector": STR_MAP,
        "tolerations": LIST_OF_OBJ,
        "affinity": OBJ,
        "podSecurityContext": OBJ,
        "securityContext": OBJ,
        "volumes": LIST_OF_OBJ,
        "volumeMounts": LIST_OF_OBJ,
        "serviceAccountName": STR,
        "priorityClassName": STR,
    }
    if worker:
        props.update({
            "disabled": BOOL,
            "replicas": REPLICAS,
            "minReplicas": REPLICAS,
            "maxReplicas": REPLICAS,
        })
        return _closed(props)
    props.update({
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": BOOL,
        "autoscalerOptions": _closed({
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
            "version": {"enum": ["v1", "v2"]},
            "imagePullPolicy": {"$ref": "#/$defs/pullPolicy"},
            "resources": {"$ref": "#/$defs/resources"},
            "env": LIST_OF_OBJ,
            "envFrom": LIST_OF_OBJ,
            "securityContext": OBJ,
        }),
    })
    return _closed(props)


def chart_schema() -> Dict[str, Any]:
    worker = _ray_group(worker=True)
    worker["properties"]["groupName"] = {"$ref": "#/$defs/groupName"}
    additional = _ray_group(worker=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "AvatarServe Helm chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "image": _closed({"repository": STR, "tag": STR, "pullPolicy": {"$ref": "#/$defs/pullPolicy"}},
                             required=["repository"]),
            "imagePullSecrets": LIST_OF_OBJ,
            "fullnameOverride": STR,
            "nameOverride": STR,
            "common": _closed({"containerEnv": LIST_OF_OBJ}),
            "head": _ray_group(worker=False),
            "worker": worker,
            "additionalWorkerGroups": {
                "type": "object", "description": "More worker groups, keyed by group name.",
                "propertyNames": {"$ref": "#/$defs/groupName"},
                "additionalProperties": additional,
            },
            "placement": _closed({
                "group": {"type": "string", "minLength": 1},
                "resource": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_.\-]*$"},
                "amount": {"type": "integer", "minimum": 1},
                "roles": {"type": "array", "uniqueItems": True,
                          "items": {"enum": ["gateway", "audio", "denoise", "vae", "cache", "ops"]}},
            }, required=["group", "resource", "amount", "roles"]),
            "dataPlane": _closed({"portMin": {"anyOf": [PORT, {"type": "null"}]},
                                  "portMax": {"anyOf": [PORT, {"type": "null"}]}}),
            "serve": _closed({
                "httpPort": PORT,
                "grpcPort": PORT,
                "proxyLocation": {"enum": ["HeadOnly", "EveryNode", "Disabled"]},
                "service": _closed({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                    "annotations": STR_MAP, "labels": STR_MAP}),
            }),
            "upgradeStrategy": {"enum": ["NewCluster", "None"],
                                "description": "RayService spec.upgradeStrategy.type."},
            "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
            "gcsFaultTolerance": _closed({"enabled": BOOL, "redisAddress": STR,
                                          "externalStorageNamespace": STR}),
            "redis": _closed({
                "enabled": BOOL,
                "url": {"type": "string", "pattern": r"^(rediss?://.*)?$"},
                "appendOnly": BOOL,
                "auth": _closed({"enabled": BOOL, "existingSecret": STR, "existingSecretPasswordKey": STR,
                                 "password": STR}),
                "image": _closed({"repository": STR, "tag": STR, "pullPolicy": {"$ref": "#/$defs/pullPolicy"}}),
                "persistence": _closed({"enabled": BOOL, "size": STR, "storageClassName": STR}),
                "resources": {"$ref": "#/$defs/resources"},
                "nodeSelector": STR_MAP,
                "tolerations": LIST_OF_OBJ,
                "affinity": OBJ,
                "podSecurityContext": OBJ,
                "securityContext": OBJ,
            }),
            "monitoring": _closed({
                "podMonitor": _closed({"enabled": BOOL, "labels": STR_MAP,
                                       "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                                       "metricRelabelings": LIST_OF_OBJ}),
                "grafanaDashboard": _closed({"enabled": BOOL, "labels": STR_MAP, "annotations": STR_MAP}),
            }),
            "apiKeys": _closed({"existingSecret": STR, "secretKey": {"type": "string", "minLength": 1},
                                "mountPath": {"type": "string", "pattern": "^/"}}),
            "ingress": _closed({
                "enabled": BOOL, "className": STR, "annotations": STR_MAP, "host": STR,
                "path": {"type": "string", "pattern": "^/"},
                "pathType": {"enum": ["Prefix", "Exact", "ImplementationSpecific"]},
                "tls": LIST_OF_OBJ,
            }),
            "networkPolicy": _closed({
                "enabled": BOOL,
                "clients": LIST_OF_OBJ,
                "metricsFrom": LIST_OF_OBJ,
                "operatorFrom": LIST_OF_OBJ,
                "allowAllBetweenRayPods": BOOL,
                "rayPorts": {"type": "array", "items": _closed({"port": PORT, "endPort": PORT},
                                                                required=["port"])},
            }),
            "app": {},  # filled from AppConfig
        },
        "$defs": {
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "resources": _closed({"limits": {"type": "object"}, "requests": {"type": "object"},
                                  "claims": LIST_OF_OBJ}),
        },
    }


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                out[k] = "#/$defs/" + APP_PREFIX + v[len("#/$defs/"):]
            elif k == "title" and isinstance(v, str):
                continue  # pydantic's generated titles only repeat the key (a property named title is a dict)
            else:
                out[k] = _rewrite_refs(v)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def app_schema() -> Dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT / "services"))
    from avatarserve.serve.config import AppConfig

    return AppConfig.model_json_schema(mode="validation")


def build() -> Dict[str, Any]:
    schema = chart_schema()
    app = _rewrite_refs(app_schema())
    defs = app.pop("$defs", {})
    app["description"] = ("The `app:` section of deploy/*.yaml (AppConfig): the Serve application's args. "
                          + app.get("description", "")).strip()
    schema["properties"]["app"] = app
    for name, d in defs.items():
        schema["$defs"][APP_PREFIX + name] = d
    return schema


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH.relative_to(REPO_ROOT)} is stale: run python scripts/gen_chart_schema.py",
                  file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
