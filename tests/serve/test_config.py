"""The typed serving configuration: defaults, validation errors that name the key's path, per-deployment values."""

from __future__ import annotations

import pytest

from avatarserve.serve.builder import build_app, serve_config
from avatarserve.serve.config import AppConfig, ConfigError, TimeoutsConfig
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
    assert sc["autoscaling_policy"]["policy_kwargs"]["capacity"]["DenoiseStage0"] == 8


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
