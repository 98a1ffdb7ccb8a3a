"""The Helm chart k8s/avatarserve, offline: every profile renders, lints strictly and validates (core kinds with
kubernetes-validate, RayService / PodMonitor against their CRDs closed to unknown fields, serveConfigV2 with Ray's
ServeDeploySchema and AppConfig); a profile's application equals its deploy file's; its GPUs fit its worker groups;
it inherits no default it did not mean; mistakes in values fail at the values schema or at the CRD."""

from __future__ import annotations

import copy
import json
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

import helm_python

from tests.k8s.render import (
    CHART, KUBERAY_CRDS, PODMONITOR_CRD, PROFILES, RELEASE, REPO, chart, core_errors, crd_errors, deploy_app,
    load_yaml, merge, profile_values, render, serve_config_errors, validation_errors,
)

ALL_PROFILES = list(PROFILES)
# Every optional object on, so that they are rendered and validated too.
EVERYTHING = {
    "monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "networkPolicy": {"enabled": True, "clients": [{"namespaceSelector": {"matchLabels": {"team": "avatars"}}}]},
    "ingress": {"enabled": True, "className": "nginx", "host": "avatar.example.com",
                "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"},
                "tls": [{"hosts": ["avatar.example.com"], "secretName": "avatar-tls"}]},
    "gcsFaultTolerance": {"enabled": True},
}


@pytest.fixture(autouse=True, scope="module")
def _quiet_helm():
    helm_python.disable_logging()


def _app_config():
    from avatarserve.serve.config import AppConfig

    return AppConfig


# ----------------------------------------------------------------------------------------- render, lint, validate


@pytest.mark.parametrize("profile", [None, *ALL_PROFILES])
@pytest.mark.parametrize("extra", [{}, EVERYTHING], ids=["defaults", "everything-on"])
def test_renders_and_validates(profile, extra):
    r = render(profile, extra)
    problems = {k: v for k, v in validation_errors(r).items() if v}
    assert not problems, json.dumps(problems, indent=2)
    _app_config().parse(r.app_args)  # the application's args are a valid AppConfig (cross-field rules included)
    kinds = {o["kind"] for o in r.objects}
    assert {"RayService", "Secret", "Service", "StatefulSet", "ConfigMap"} <= kinds
    if extra:
        assert {"PodMonitor", "NetworkPolicy", "Ingress"} <= kinds


@pytest.mark.parametrize("profile", [None, *ALL_PROFILES])
def test_lints_strictly(profile):
    values = merge(profile_values(profile), EVERYTHING)
    for kube in ("v1.27.0", "v1.37.0"):
        report = helm_python.lint(str(CHART), values, strict=True, kube_version=kube)
        bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not bad, bad


def test_lint_reports_a_values_mistake():
    report = helm_python.lint(str(CHART), {"head": {"enableInTreeAutoscalling": True}}, strict=True)
    assert any("enableInTreeAutoscalling" in m["error"] and m["severity"] == 3 for m in report["messages"])


def test_values_schema_is_generated_from_appconfig():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_chart_schema", REPO / "scripts" / "gen_chart_schema.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (CHART / "values.schema.json").read_text() == gen.render(), \
        "k8s/avatarserve/values.schema.json is stale: run python scripts/gen_chart_schema.py"


# ----------------------------------------------------------------------------------- the Serve application


def _k8s_overlay(values: Dict[str, Any]) -> Dict[str, Any]:
    """What the chart adds to a profile's `app:` (each from one chart value): the data-plane port range and the
    placement resource of the pinned roles."""
    merged = chart().merge_values(values)
    overlay: Dict[str, Any] = {}
    dp = merged["dataPlane"]
    if dp.get("portMin") is not None:
        overlay["data_plane"] = {"port_min": dp["portMin"], "port_max": dp["portMax"]}
    for role in merged["placement"]["roles"]:
        overlay.setdefault("resources", {})[role] = {"resources": {merged["placement"]["resource"]: 1}}
    return overlay


def _normalised(application: Dict[str, Any]) -> Dict[str, Any]:
    AppConfig = _app_config()
    out = dict(application)
    out["args"] = AppConfig.parse(out["args"])
    if "autoscaling_policy" in out:
        policy = dict(out["autoscaling_policy"])
        policy["policy_kwargs"] = {k: AppConfig.parse(v) if k == "app" else v
                                   for k, v in policy["policy_kwargs"].items()}
        out["autoscaling_policy"] = policy
    return out


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_profile_app_is_the_deploy_files_app(profile):
    from avatarserve.serve.builder import serve_config

    # The profile carries the deploy file's `app:` key for key ...
    assert profile_values(profile)["app"] == deploy_app(profile)
    # ... and the rendered application is serve_config() of it plus exactly the chart's cluster keys.
    r = render(profile)
    overlay = _k8s_overlay(profile_values(profile))
    assert "data_plane" not in deploy_app(profile)
    for role in overlay["resources"]:
        assert not (deploy_app(profile).get("resources", {}).get(role) or {}).get("resources"), role
    (expected,) = serve_config(merge(deploy_app(profile), overlay))["applications"]
    assert _normalised(r.application) == _normalised(expected)
    assert set(r.serve_config["applications"][0]) == set(expected)


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_pinning_keeps_the_roles_actor_options(profile):
    """The placement resource is the only thing the chart changes in a pinned role's actor options."""
    AppConfig = _app_config()
    rendered = AppConfig.parse(render(profile).app_args).resources
    deployed = AppConfig.parse(deploy_app(profile)).resources
    placement = chart().merge_values(profile_values(profile))["placement"]
    for role in placement["roles"]:
        got, want = getattr(rendered, role), getattr(deployed, role)
        assert got.resources == {**want.resources, placement["resource"]: 1}, role
        assert (got.num_cpus, got.num_gpus, got.accelerator_type) == \
            (want.num_cpus, want.num_gpus, want.accelerator_type), role


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_autoscaling_policy_iff_enabled(profile):
    from avatarserve.serve.control.autoscale import PolicyParams

    r = render(profile)
    enabled = bool(deploy_app(profile).get("autoscaling", {}).get("enabled"))
    app = r.application
    assert ("autoscaling_policy" in app) == enabled
    if enabled:
        policy = app["autoscaling_policy"]
        assert policy["policy_function"] == "avatarserve.serve.control.autoscale:SessionAutoscalingPolicy"
        assert policy["policy_kwargs"] == {"app": app["args"]}
        PolicyParams.from_dict(policy["policy_kwargs"])  # what the policy does with it
    cluster = r.cluster
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_serve_proxies_match_the_builder():
    from avatarserve.serve import builder

    cfg = render("cpu").serve_config
    grpc = builder.grpc_options(9000)
    assert cfg["grpc_options"] == {"port": 9000, "grpc_servicer_functions": list(grpc.grpc_servicer_functions),
                                   "enable_reflection": grpc.enable_reflection}
    assert cfg["grpc_options"]["grpc_servicer_functions"] == [builder.AVATAR_SERVICER, builder.HEALTH_SERVICER]
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert cfg["proxy_location"] == "HeadOnly"
    app = cfg["applications"][0]
    assert (app["import_path"], app["route_prefix"]) == (builder.APP_BUILDER, "/avatarserve")  # ops: /avatarserve/ops/
    assert builder.POLICY_PATH == "avatarserve.serve.control.autoscale:SessionAutoscalingPolicy"


# ------------------------------------------------------------------------------------------- cluster shape


def test_ports_and_serve_service():
    r = render("tpp-5gpu", EVERYTHING)
    rs = r.rayservice
    assert rs["apiVersion"] == "ray.io/v1" and rs["metadata"]["name"] == RELEASE
    head_ports = {p["name"]: p["containerPort"] for p in r.container("head")["ports"]}
    assert {k: head_ports[k] for k in ("gcs-server", "dashboard", "client", "serve", "serve-grpc", "metrics")} == {
        "gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "serve-grpc": 9000, "metrics": 8080}
    for name, group in r.groups().items():
        if name != "head":
            assert {p["name"]: p["containerPort"] for p in r.container(name)["ports"]} == {"metrics": 8080}
    svc = rs["spec"]["serveService"]
    # KubeRay's default name for the RayService's Serve Service, set explicitly: clients use it.
    assert svc["metadata"]["name"] == f"{RELEASE}-serve-svc" == f"{rs['metadata']['name']}-serve-svc"
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["serve-grpc"]["port"] == 9000 and ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["serve"]["port"] == 8000
    # KubeRay (>= 1.6) keeps user ports whose names match the head container's serving ports (serve, serve-*).
    assert set(ports) <= {n for n in head_ports if n == "serve" or n.startswith("serve-")}
    ingress = r.get("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{RELEASE}-serve-svc", "port": {"number": 9000}}


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_redis_reaches_every_ray_container_from_the_secret(profile):
    r = render(profile)
    secret = r.get("Secret", f"{RELEASE}-redis")
    for group in r.groups():
        env = {e["name"]: e for e in r.container(group)["env"]}
        assert env["REDIS_URL"]["value"] == f"redis://{RELEASE}-redis.avatarserve.svc:6379/0"
        assert env["REDIS_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": secret["metadata"]["name"], "key": "redis-password"}}
    config = r.rayservice["spec"]["serveConfigV2"]
    assert "redis" not in config.lower() and "redis_url" not in r.app_args
    assert "registry_namespace" not in r.app_args  # <RAY_CLUSTER_NAME>: (KubeRay sets it)
    import base64

    assert base64.b64decode(secret["data"]["redis-password"]).decode() not in config
    sts = r.get("StatefulSet", f"{RELEASE}-redis")
    assert "--requirepass" in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert r.get("Service", f"{RELEASE}-redis")["spec"]["ports"][0]["port"] == 6379


def _redis_args(values=None):
    args = render("cpu", values).get("StatefulSet", f"{RELEASE}-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    return {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}


def test_redis_keeps_its_data_across_restarts_by_default():
    """AOF on by default (with or without a PVC): a restarted Redis keeps every session (README: Redis outages)."""
    assert _redis_args()["--appendonly"] == "yes" and _redis_args()["--dir"] == "/data"
    assert _redis_args({"redis": {"persistence": {"enabled": True}}})["--appendonly"] == "yes"
    off = _redis_args({"redis": {"appendOnly": False}})
    assert off["--appendonly"] == "no" and off["--save"] == ""


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_api_keys_file_from_a_secret(profile):
    r = render(profile, {"apiKeys": {"existingSecret": "avatar-keys"}})
    assert r.app_args["auth"]["keys_file"] == "/etc/avatarserve/api-keys/keys.jsonl"
    assert _app_config().parse(r.app_args).auth.mode == "required"
    for name, group in r.groups().items():
        mounts = {m["name"]: m for m in r.container(name)["volumeMounts"]}
        assert mounts["api-keys"] == {"name": "api-keys", "mountPath": "/etc/avatarserve/api-keys", "readOnly": True}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["api-keys"]["secret"] == {"secretName": "avatar-keys"}
    plain = render(profile)  # no Secret: no keys file, auth stays required (keys in Redis)
    assert "keys_file" not in plain.app_args.get("auth", {})
    assert _app_config().parse(plain.app_args).auth.mode == "required"


def test_gcs_fault_tolerance_uses_the_same_redis_and_secret():
    r = render("cpu", {"gcsFaultTolerance": {"enabled": True}})
    ft = r.cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == f"{RELEASE}-redis.avatarserve.svc:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-redis", "key": "redis-password"}
    # KubeRay injects REDIS_PASSWORD into the head from gcsFaultToleranceOptions and rejects a head container that
    # sets it as well; the workers still get it from the chart.
    assert "REDIS_PASSWORD" not in {e["name"] for e in r.container("head")["env"]}
    assert "REDIS_PASSWORD" in {e["name"] for e in r.container("cpu")["env"]}


def test_external_redis_with_an_existing_secret():
    r = render("cpu", {"redis": {"enabled": False, "url": "redis://redis.shared:6380/2",
                                 "auth": {"existingSecret": "shared-redis", "existingSecretPasswordKey": "pw"}},
                       "gcsFaultTolerance": {"enabled": True}})
    assert not r.all("StatefulSet") and not r.all("Secret")
    env = {e["name"]: e for e in r.container("cpu")["env"]}
    assert env["REDIS_URL"]["value"] == "redis://redis.shared:6380/2"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "pw"}
    assert r.cluster["gcsFaultToleranceOptions"]["redisAddress"] == "redis.shared:6380"
    assert not {k: v for k, v in validation_errors(r).items() if v}


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_always_on_roles_are_pinned_to_the_head(profile):
    r = render(profile)
    placement = chart().merge_values(profile_values(profile))["placement"]
    # Ray's own KubeRay autoscaler parser reads what each group offers.
    assert r.head_ray_resources == {placement["resource"]: placement["amount"]}
    for group in r.groups():
        if group != "head":
            assert placement["resource"] not in r.ray_resources(group)
    resources = r.app_args["resources"]
    for role in ("gateway", "cache", "ops"):
        assert resources[role]["resources"] == {placement["resource"]: 1}
    for role in ("audio", "denoise", "vae"):
        assert placement["resource"] not in (resources.get(role) or {}).get("resources", {})


def test_placement_on_an_always_on_worker_group():
    values = {"placement": {"group": "ingress"},
              "additionalWorkerGroups": {"ingress": {"minReplicas": 1, "maxReplicas": 1,
                                                    "resources": {"limits": {"cpu": "2", "memory": "4Gi"}}}}}
    r = render("cpu", values)
    assert r.ray_resources("ingress") == {"avatarserve_ingress": 1000}
    assert r.head_ray_resources == {}
    assert not {k: v for k, v in validation_errors(r).items() if v}
    values["additionalWorkerGroups"]["ingress"]["maxReplicas"] = 3
    with pytest.raises(helm_python.HelmError, match="must be always on"):
        render("cpu", values)


def _quantity(q: Any) -> Decimal:
    s = str(q)
    return Decimal(s[:-1]) / 1000 if s.endswith("m") else Decimal(s)


def _nodes(r) -> List[Dict[str, Any]]:
    """Every pod the cluster can have (head + each worker group at maxReplicas) with the Ray resources it offers."""
    nodes = []
    for name, group in r.groups().items():
        limits = r.container(name).get("resources", {}).get("limits", {})
        offer = {"CPU": _quantity(limits.get("cpu", 0)), "GPU": _quantity(limits.get("nvidia.com/gpu", 0))}
        offer.update({k: Decimal(v) for k, v in r.ray_resources(name).items()})
        for i in range(1 if name == "head" else int(group["maxReplicas"])):
            nodes.append({"name": f"{name}-{i}", "group": name, "free": dict(offer)})
    return nodes


def _replicas(app) -> List[Dict[str, Any]]:
    """Every replica the application can have at its largest, with what it reserves."""
    def need(res) -> Dict[str, Decimal]:
        out = {"CPU": Decimal(str(res.num_cpus)), "GPU": Decimal(str(res.num_gpus))}
        out.update({k: Decimal(str(v)) for k, v in res.resources.items()})
        return out

    auto = app.autoscaling
    out = []
    for dep in app.stage_deployments:
        role = app.role_of(dep)
        n = auto.max_of(role, app.replicas) if auto.enabled else getattr(app.replicas, role)
        out += [{"name": dep, "need": need(getattr(app.resources, role))}] * n
    out += [{"name": "Gateway", "need": need(app.resources.gateway)}] * app.replicas.gateway
    out += [{"name": "SinkFrameCache", "need": need(app.resources.cache)}]
    if app.ops.enabled:
        out += [{"name": "OpsDashboard", "need": need(app.resources.ops)}]
    return out


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_gpus_and_replicas_fit_the_worker_groups(profile):
    r = render(profile)
    app = _app_config().parse(r.app_args)
    replicas = _replicas(app)
    nodes = _nodes(r)
    # The sum the stages ask for at their largest fits the GPU groups at theirs ...
    demand = sum(x["need"]["GPU"] for x in replicas)
    supply = sum(n["free"]["GPU"] for n in nodes if n["group"] != "head")
    assert demand <= supply, f"{profile}: stages ask for {demand} GPUs, the worker groups offer {supply}"
    # ... and so does every replica, packed first-fit-decreasing onto the pods (CPU, GPU, custom resources), the
    # way Ray places them: nothing the autoscaler could never schedule.
    for rep in sorted(replicas, key=lambda x: (x["need"]["GPU"], x["need"]["CPU"]), reverse=True):
        for node in nodes:
            if all(node["free"].get(k, Decimal(0)) >= v for k, v in rep["need"].items()):
                for k, v in rep["need"].items():
                    node["free"][k] -= v
                break
        else:
            pytest.fail(f"{profile}: {rep['name']} ({rep['need']}) fits no pod: {nodes}")
    if app.model.device.startswith("cuda"):
        assert supply > 0


# ------------------------------------------------------------------------------------ no unintended defaults


def _pruned(v: Any) -> Any:
    if isinstance(v, dict):
        out = {k: _pruned(x) for k, x in v.items()}
        return {k: x for k, x in out.items() if x not in ({}, [], "", None, False, 0)}
    if isinstance(v, list):
        return [_pruned(x) for x in v]
    return v


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_profile_inherits_no_default_it_does_not_state(profile):
    own = profile_values(profile)
    merged = chart().merge_values(own)
    for section in ("app", "worker", "additionalWorkerGroups"):
        assert _pruned(merged.get(section, {})) == _pruned(own.get(section, {})), section


def test_cpu_profile_has_no_gpu_anywhere():
    r = render("cpu", EVERYTHING)
    text = yaml.safe_dump(r.rayservice)
    assert "nvidia.com/gpu" not in text and "cuda" not in text.lower()
    assert set(r.groups()) == {"head", "cpu"}
    app = _app_config().parse(r.app_args)
    assert all(app.model.for_role(role).device == "cpu" for role in ("audio", "denoise", "vae"))
    assert all(getattr(app.resources, role).num_gpus == 0
               for role in ("gateway", "audio", "denoise", "vae", "cache", "ops"))
    assert not r.container("cpu").get("resources", {}).get("limits", {}).get("nvidia.com/gpu")


@pytest.mark.parametrize("profile", ["single-gpu", "tpp-5gpu"])
def test_gpu_profiles_have_only_their_own_groups(profile):
    r = render(profile)
    assert set(r.groups()) == {"head", "gpu"}
    assert "nvidia.com/gpu" not in r.container("head").get("resources", {}).get("limits", {})
    assert r.container("gpu")["resources"]["limits"]["nvidia.com/gpu"] >= 1


# -------------------------------------------------------------------------------------- monitoring, files


def test_pod_monitors_and_dashboard():
    r = render("cpu", EVERYTHING)
    by_type = {pm["spec"]["selector"]["matchLabels"]["ray.io/node-type"]: pm for pm in r.all("PodMonitor")}
    assert set(by_type) == {"head", "worker"}
    assert [e["port"] for e in by_type["worker"]["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert "metrics" in [e["port"] for e in by_type["head"]["spec"]["podMetricsEndpoints"]]
    # The same relabelling as the local scrape config (deploy/prometheus.yml).
    scrape = load_yaml(REPO / "deploy" / "prometheus.yml")["scrape_configs"][0]["metric_relabel_configs"]
    camel = [{re.sub(r"_(\w)", lambda m: m.group(1).upper(), k): v for k, v in rule.items()} for rule in scrape]
    for pm in r.all("PodMonitor"):
        for endpoint in pm["spec"]["podMetricsEndpoints"]:
            assert endpoint["metricRelabelings"] == camel
    cm = r.get("ConfigMap", f"{RELEASE}-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    # One dashboard file: deploy/grafana/avatarserve.json is a link to the chart's copy.
    link = REPO / "deploy" / "grafana" / "avatarserve.json"
    assert link.is_symlink() and link.resolve() == (CHART / "dashboards" / "avatarserve.json").resolve()
    assert not Path(os.readlink(link)).is_absolute()
    assert json.loads(cm["data"]["avatarserve.json"]) == json.loads(link.read_text())
    assert not render("cpu").all("PodMonitor")  # off unless asked for (needs the Prometheus Operator's CRDs)


def test_network_policy_opens_the_data_plane_range_the_app_uses():
    r = render("tpp-5gpu", merge(EVERYTHING, {"dataPlane": {"portMin": 21000, "portMax": 21049}}))
    assert r.app_args["data_plane"] == {"port_min": 21000, "port_max": 21049}
    ray_policy = r.get("NetworkPolicy", f"{RELEASE}-ray")
    ranges = [p for rule in ray_policy["spec"]["ingress"] for p in rule.get("ports", []) if "endPort" in p]
    assert {"protocol": "TCP", "port": 21000, "endPort": 21049} in ranges
    redis_policy = r.get("NetworkPolicy", f"{RELEASE}-redis")
    assert redis_policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6379}]
    client_ports = {p["port"] for rule in ray_policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert {9000, 8000, 8080, 8265} <= client_ports


def test_image_and_ray_versions_agree():
    pyproject = (REPO / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[serve\]==([\d.]+)"', pyproject).group(1)
    assert chart().values["head"]["rayVersion"] == ray_pin
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_IMAGE_TAG={re.escape(ray_pin)}-py311$", dockerfile, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_IMAGE_TAG\}", dockerfile, re.M)
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored
    assert not any(p.startswith("services") for p in ignored)  # the toy weights ship in the package


# --------------------------------------------------------------------------------------------- negative cases


@pytest.mark.parametrize("values, message", [
    ({"head": {"enableInTreeAutoscalling": True}}, "enableInTreeAutoscalling"),               # misspelled key
    ({"app": {"timeouts": {"pipe_open_sx": 10}}}, "pipe_open_sx"),                            # ... in app (AppConfig)
    ({"redis": {"persistance": {"enabled": True}}}, "persistance"),
    ({"worker": {"maxReplicas": "five"}}, "/worker/maxReplicas"),                             # wrong type
    ({"app": {"torch_threads": 1.5}}, "/app/torch_threads"),
    ({"serve": {"grpcPort": 70000}}, "/serve/grpcPort"),
    ({"head": {"rayStartParams": {"num-cpus": 2}}}, "/head/rayStartParams/num-cpus"),         # strings only
    ({"serve": {"proxyLocation": "Everywhere"}}, "/serve/proxyLocation"),                     # bad enum
    ({"app": {"model": {"dtype": "float8"}}}, "/app/model/dtype"),
    ({"head": {"autoscalerOptions": {"upscalingMode": "Fast"}}}, "upscalingMode"),
    ({"upgradeStrategy": "BlueGreen"}, "/upgradeStrategy"),
])
def test_values_schema_rejects(values, message):
    with pytest.raises(helm_python.HelmValuesError) as err:
        render("cpu", values)
    assert message in str(err.value)


@pytest.mark.parametrize("values, message", [
    ({"app": {"redis_url": "redis://x:6379"}}, "app.redis_url must stay unset"),
    ({"app": {"data_plane": {"port_min": 1, "port_max": 2}}}, "dataPlane.portMin"),
    ({"dataPlane": {"portMin": 20100, "portMax": 20000}}, "must be <= dataPlane.portMax"),
    ({"app": {"resources": {"gateway": {"resources": {"avatarserve_ingress": 5}}}}}, "set by the chart"),
    ({"placement": {"group": "nowhere"}}, "neither"),
    ({"head": {"rayStartParams": {"resources": "'{\"x\": 1}'"}}}, "rayResources"),
    ({"redis": {"enabled": False}}, "set redis.url"),
    ({"redis": {"enabled": False, "url": "redis://:secret@host:6379"}}, "must not contain credentials"),
    ({"fullnameOverride": "1avatar"}, "DNS-1035"),
    ({"fullnameOverride": "a" * 48}, "longer than 47"),
])
def test_templates_refuse(values, message):
    with pytest.raises(helm_python.HelmError) as err:
        render("cpu", values)
    assert message in str(err.value)


@pytest.mark.parametrize("values, message", [
    # Kubernetes objects pass through the values schema as objects; the CRD (closed) checks their insides.
    ({"head": {"podSecurityContext": {"runAsUsr": 1000}}}, "'runAsUsr' was unexpected"),
    ({"worker": {"tolerations": [{"key": "x", "operater": "Exists"}]}}, "'operater' was unexpected"),
    ({"worker": {"resources": {"limits": {"cpu": "two"}}}}, "'two' does not match"),
])
def test_crd_rejects_passthrough_mistakes(values, message):
    r = render("cpu", values)  # the values schema lets these through ...
    for filename in KUBERAY_CRDS.values():  # ... the RayService CRD does not
        assert any(message in e for e in crd_errors(r.rayservice, filename)), crd_errors(r.rayservice, filename)


def _mutated(obj: Dict[str, Any], path: str, value: Any) -> Dict[str, Any]:
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = value
    return out


@pytest.mark.parametrize("path, value, message", [
    ("spec.rayClusterConfig.enableInTreeAutoscalling", True, "'enableInTreeAutoscalling' was unexpected"),
    ("spec.rayClusterConfig.autoscalerOptions.upscalingMode", "Fast", "is not one of"),
    ("spec.rayClusterConfig.workerGroupSpecs.0.maxReplicas", "5", "is not of type 'integer'"),
    ("spec.serveService.spec.ports.1.appProtocoll", "h2c", "'appProtocoll' was unexpected"),
    ("spec.rayClusterConfig.autoscalerOptions.version", "v3", "is not one of"),
    ("spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 2, "is not of type 'string'"),
])
def test_crd_rejects_rayservice_mistakes(path, value, message):
    rs = _mutated(render("cpu").rayservice, path, value)
    for filename in KUBERAY_CRDS.values():
        assert any(message in e for e in crd_errors(rs, filename)), crd_errors(rs, filename)


def test_fields_newer_than_kuberay_1_6_fail():
    """The chart supports KubeRay >= 1.6: a field only 1.7 knows (the API server of 1.6 would prune it silently)."""
    rs = _mutated(render("cpu", {"gcsFaultTolerance": {"enabled": True}}).rayservice,
                  "spec.rayClusterConfig.gcsFaultToleranceOptions.backend", "redis")
    assert not crd_errors(rs, KUBERAY_CRDS["1.7.0"])
    assert any("'backend' was unexpected" in e for e in crd_errors(rs, KUBERAY_CRDS["1.6.2"]))


def test_crd_and_core_schemas_reject_mistakes_in_other_objects():
    r = render("cpu", EVERYTHING)
    pm = _mutated(r.get("PodMonitor", f"{RELEASE}-ray-head"), "spec.podMetricsEndpoints.0.intervall", "5s")
    assert any("'intervall' was unexpected" in e for e in crd_errors(pm, PODMONITOR_CRD))
    sts = _mutated(r.get("StatefulSet"), "spec.replica", 1)
    assert any("'replica' was unexpected" in e for e in core_errors(sts, "1.37.0"))
    np_ = _mutated(r.get("NetworkPolicy", f"{RELEASE}-ray"), "spec.policyTypes", "Ingress")
    assert core_errors(np_, "1.37.0")
    config = dict(r.serve_config, proxy_location="Everywhere", grpc_option={})
    errors = serve_config_errors(config)
    assert any(e.startswith("proxy_location:") for e in errors) and "grpc_option: not a field of ServeDeploySchema" in errors
