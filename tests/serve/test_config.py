"""The typed serving configuration: defaults, validation errors that name the key's path, per-deployment values."""

from __future__ import annotations

import pytest

from avatarserve.serve.builder import build_app, serve_config
from avatarserve.serve.config import AppConfig, ConfigError, DataPlaneSection, TimeoutsConfig, resolve_redis_url
from avatarserve.serve.control.autoscale import AutoscalePolicyError, PolicyParams
from avatarserve.serve.ops.launcher import LauncherError, load_config

BASE = {"redis_url": "redis://127.0.0.1:1/0", "model": {"config": "tiny"}}


def test_defaults_are_valid_and_model_loading_has_no_limit() -> None:
    t = TimeoutsConfig()
    assert t.deploy_s is None  # `up` waits while replicas load
    assert t.heartbeat_s < t.registry_ttl_s
    assert "no time limit" in TimeoutsConfig.model_fields["stage_start_s"].description
    assert all(f.description for f in TimeoutsConfig.model_fields.values())
    app = AppConfig()
    assert app.model.config == "toy" and app.stage_deployments[0] == "AudioEncoder"
    assert app.in_flight_limit == len(app.stage_deployments) + 2


def test_unknown_key_and_wrong_type_name_the_path() -> None:
    with pytest.raises(ConfigError, match=r"app\.timeouts\.pipe_open_sx: Extra inputs are not permitted"):
        AppConfig.parse({"timeouts": {"pipe_open_sx": 3}})
    with pytest.raises(ConfigError, match=r"app\.timeouts\.session_ttl_s: Input should be a valid number"):
        AppConfig.parse({"timeouts": {"session_ttl_s": "an hour"}})
    with pytest.raises(ConfigError, match=r"app\.timeouts\.hop_drain_s: Input should be greater than 0"):
        TimeoutsConfig.parse({"hop_drain_s": 0})
    with pytest.raises(ConfigError, match="heartbeat_s .* must be below registry_ttl_s"):
        TimeoutsConfig.parse({"heartbeat_s": 5, "registry_ttl_s": 5})
    with pytest.raises(ConfigError, match=r"app\.timeouts\.deployments\.VaeDecoder\.pipe_open: Extra inputs"):
        TimeoutsConfig.parse({"deployments": {"VaeDecoder": {"pipe_open": 3}}})
    with pytest.raises(ConfigError, match=r"app\.capacity\.denoise: Input should be greater than or equal to 1"):
        AppConfig.parse({"capacity": {"denoise": 0}})
    with pytest.raises(ConfigError, match=r"app\.autoscaling\.max_replica: Extra inputs are not permitted"):
        AppConfig.parse({"autoscaling": {"max_replica": {"audio": 2}}})
    with pytest.raises(ConfigError, match=r"app\.model: unknown config 'huge'"):
        AppConfig.parse({"model": {"config": "huge"}})
    with pytest.raises(ConfigError, match=r"app\.model\.dtype: Input should be 'float32', 'float16' or 'bfloat16'"):
        AppConfig.parse({"model": {"dtype": "fp8"}})


def test_per_deployment_overrides() -> None:
    t = TimeoutsConfig.parse({"pipe_open_s": 100, "deployments": {"VaeDecoder": {"pipe_open_s": 400}}})
    assert t.for_deployment("VaeDecoder").pipe_open_s == 400
    assert t.for_deployment("DenoiseStage0").pipe_open_s == 100
    with pytest.raises(ConfigError, match="heartbeat_s .* must be below registry_ttl_s"):
        TimeoutsConfig.parse({"deployments": {"AudioEncoder": {"heartbeat_s": 30}}}).for_deployment("AudioEncoder")


def test_app_config_checks_deployment_names_and_moved_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown deployment\(s\) \['DenoiseStage9'\]"):
        serve_config({**BASE, "timeouts": {"deployments": {"DenoiseStage9": {"pipe_open_s": 1}}}})
    with pytest.raises(ConfigError, match=r"app\.drain_timeout_s moved to app\.timeouts\.session_drain_s"):
        serve_config({**BASE, "drain_timeout_s": 60})
    with pytest.raises(ConfigError, match=r"app\.handlers\.decoder: Extra inputs are not permitted"):
        serve_config({**BASE, "handlers": {"decoder": "x:y"}})
    with pytest.raises(ConfigError, match=r"app\.handlers\.vae: String should match pattern"):
        serve_config({**BASE, "handlers": {"vae": "not a path"}})


def test_serve_config_round_trips_through_the_builder() -> None:
    """What `deploy` sends Serve (JSON args) builds the same typed config back."""
    cfg = {**BASE, "timeouts": {"session_drain_s": 42}, "autoscaling": {"enabled": True}}
    sc = serve_config(cfg)["applications"][0]
    assert AppConfig.parse(sc["args"]) == AppConfig.parse(cfg).model_copy(update={"name": "avatarserve"})
    # The policy reads the application's own args: one source for capacity and autoscaling.
    assert sc["autoscaling_policy"]["policy_kwargs"] == {"app": sc["args"]}
    params = PolicyParams.from_dict(sc["autoscaling_policy"]["policy_kwargs"])
    assert params.capacity["DenoiseStage0"] == 8 and set(params.capacity) == set(AppConfig.parse(cfg).stage_deployments)
    with pytest.raises(AutoscalePolicyError, match=r"app\.capacity\.vae"):
        PolicyParams.from_dict({"app": {"capacity": {"vae": 0}}})


def test_data_plane_addresses() -> None:
    """bind/advertise of a replica on a node with IP 10.1.2.3 (the pod IP on Kubernetes)."""
    assert DataPlaneSection().addresses("10.1.2.3") == ("10.1.2.3", "10.1.2.3")  # default: the node IP
    assert DataPlaneSection(bind_host="0.0.0.0").addresses("10.1.2.3") == ("0.0.0.0", "10.1.2.3")
    assert DataPlaneSection(bind_host="127.0.0.1").addresses("10.1.2.3") == ("127.0.0.1", "127.0.0.1")
    assert DataPlaneSection(bind_host="0.0.0.0", advertise_host="stage.example").addresses("10.1.2.3") == \
        ("0.0.0.0", "stage.example")
    assert DataPlaneSection(port_min=20000, port_max=20009).port_range == (20000, 20009)
    with pytest.raises(ConfigError, match=r"app\.data_plane: port_min and port_max go together"):
        AppConfig.parse({"data_plane": {"port_min": 20000}})
    with pytest.raises(ConfigError, match=r"port_min \(20010\) must be <= port_max \(20000\)"):
        AppConfig.parse({"data_plane": {"port_min": 20010, "port_max": 20000}})
    with pytest.raises(ConfigError, match=r"app\.bind_host moved to app\.data_plane\.bind_host"):
        AppConfig.parse({"bind_host": "0.0.0.0"})


def test_per_role_device_dtype_and_placement() -> None:
    app = AppConfig.parse({"model": {"device": "cuda", "dtype": "bfloat16",
                                     "roles": {"audio": {"device": "cpu", "dtype": "float32"}}},
                           "resources": {"audio": {"num_gpus": 0}, "denoise": {"num_gpus": 1, "accelerator_type": "H100",
                                                                               "resources": {"tpp": 1}},
                                         "vae": {"num_gpus": 1}}})
    assert (app.model.for_role("audio").device, app.model.for_role("audio").dtype) == ("cpu", "float32")
    assert (app.model.for_role("denoise").device, app.model.for_role("denoise").dtype) == ("cuda", "bfloat16")
    assert app.resources.denoise.actor_options() == {"num_cpus": 0.1, "num_gpus": 1.0, "resources": {"tpp": 1.0},
                                                     "accelerator_type": "H100"}
    assert app.resources.audio.actor_options() == {"num_cpus": 0.1, "num_gpus": 0.0}
    # A role that would load onto CUDA without reserving a GPU is refused, naming both keys.
    with pytest.raises(ConfigError, match=r"model\.device is 'cuda' but resources\.audio\.num_gpus is 0"):
        AppConfig.parse({"model": {"device": "cuda"}, "resources": {"denoise": {"num_gpus": 1}, "vae": {"num_gpus": 1}}})
    with pytest.raises(ConfigError, match=r"model\.roles\.vae\.device is 'cuda:1' but resources\.vae\.num_gpus is 0"):
        AppConfig.parse({"model": {"roles": {"vae": {"device": "cuda:1"}}}})
    with pytest.raises(ConfigError, match=r"app\.resources\.denoise: resources: names must be"):
        AppConfig.parse({"resources": {"denoise": {"resources": {"tpp": 0}}}})


def test_role_device_and_placement_reach_the_stage_deployments() -> None:
    app = build_app({**BASE, "model": {"config": "tiny", "device": "cpu", "roles": {"denoise": {"dtype": "bfloat16"}}},
                     "resources": {"denoise": {"num_cpus": 0.5, "resources": {"gpu-node": 1}}}})
    gateway = app._bound_deployment
    stages = {a._bound_deployment.name: a._bound_deployment for a in gateway.init_args[1:] if hasattr(a, "_bound_deployment")}
    d0 = stages["DenoiseStage0"]
    assert d0.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"gpu-node": 1.0}}
    assert d0.init_args[0]["handler_config"]["model"]["dtype"] == "bfloat16"
    assert stages["VaeDecoder"].init_args[0]["handler_config"]["model"]["dtype"] == "float32"


def test_redis_url_and_registry_namespace_from_the_environment(monkeypatch) -> None:
    env = {"REDIS_URL": "redis://redis.svc:6379/0", "REDIS_PASSWORD": "p@ss/word"}
    assert resolve_redis_url(None, env) == "redis://:p%40ss%2Fword@redis.svc:6379/0"
    assert resolve_redis_url("redis://:inline@h:1/0", env) == "redis://:inline@h:1/0"  # the URL's own password wins
    assert resolve_redis_url("redis://h:1/0", {}) == "redis://h:1/0"
    with pytest.raises(ConfigError, match="neither is REDIS_URL"):
        resolve_redis_url(None, {})
    monkeypatch.setenv("RAY_CLUSTER_NAME", "avatarserve-blue")
    assert AppConfig().registry_prefix == "avatarserve-blue:"
    assert AppConfig(registry_namespace="").registry_prefix == ""  # explicit wins
    monkeypatch.delenv("RAY_CLUSTER_NAME")
    assert AppConfig().registry_prefix == ""


def test_timeouts_reach_every_deployment() -> None:
    app = build_app({**BASE, "timeouts": {"session_drain_s": 42, "aas_wait_s": 77,
                                          "deployments": {"DenoiseStage1": {"aas_wait_s": 7}}}})
    gateway = app._bound_deployment
    assert gateway.init_args[0].timeouts.session_drain_s == 42
    stages = {a._bound_deployment.name: a._bound_deployment for a in gateway.init_args[1:] if hasattr(a, "_bound_deployment")}
    spec, stage_app = stages["DenoiseStage1"].init_args
    assert spec["handler_config"]["aas_wait_s"] == 7 and stage_app.timeouts.session_drain_s == 42
    assert stages["DenoiseStage0"].init_args[0]["handler_config"]["aas_wait_s"] == 77


def test_launcher_rejects_a_bad_file_before_starting_anything(tmp_path) -> None:
    cases = {
        "app:\n  timeouts:\n    stage_start: 10\n": r"app\.timeouts\.stage_start: Extra inputs are not permitted",
        "app:\n  startup_timeout_s: 300\n": r"app\.startup_timeout_s moved to app\.timeouts\.deploy_s",
        "app:\n  queue_sise: 2\n": r"app\.queue_sise: Extra inputs are not permitted",
        "app:\n  replicas: {denoise: two}\n": r"app\.replicas\.denoise: Input should be a valid integer",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        with pytest.raises(LauncherError, match=message):
            load_config(path)
