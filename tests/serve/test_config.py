"""The typed serving configuration: defaults, validation errors that name the key's path, per-deployment values."""

from __future__ import annotations

import pytest

from avatarserve.serve.app import AppConfigError, build_app, serve_config
from avatarserve.serve.config import ConfigError, TimeoutsConfig
from avatarserve.serve.launcher import LauncherError, load_config

BASE = {"redis_url": "redis://127.0.0.1:1/0", "model": {"config": "tiny"}}


def test_defaults_are_valid_and_model_loading_has_no_limit() -> None:
    t = TimeoutsConfig()
    assert t.deploy_s is None  # `up` waits while replicas load
    assert t.heartbeat_s < t.registry_ttl_s
    assert "no time limit" in TimeoutsConfig.model_fields["stage_start_s"].description
    assert all(f.description for f in TimeoutsConfig.model_fields.values())


def test_unknown_key_and_wrong_type_name_the_path() -> None:
    with pytest.raises(ConfigError, match=r"app\.timeouts\.pipe_open_sx: Extra inputs are not permitted"):
        TimeoutsConfig.parse({"pipe_open_sx": 3})
    with pytest.raises(ConfigError, match=r"app\.timeouts\.session_ttl_s: Input should be a valid number"):
        TimeoutsConfig.parse({"session_ttl_s": "an hour"})
    with pytest.raises(ConfigError, match=r"app\.timeouts\.hop_drain_s: Input should be greater than 0"):
        TimeoutsConfig.parse({"hop_drain_s": 0})
    with pytest.raises(ConfigError, match="heartbeat_s .* must be below registry_ttl_s"):
        TimeoutsConfig.parse({"heartbeat_s": 5, "registry_ttl_s": 5})
    with pytest.raises(ConfigError, match=r"app\.timeouts\.deployments\.VaeDecoder\.pipe_open: Extra inputs"):
        TimeoutsConfig.parse({"deployments": {"VaeDecoder": {"pipe_open": 3}}})


def test_per_deployment_overrides() -> None:
    t = TimeoutsConfig.parse({"pipe_open_s": 100, "deployments": {"VaeDecoder": {"pipe_open_s": 400}}})
    assert t.for_deployment("VaeDecoder").pipe_open_s == 400
    assert t.for_deployment("DenoiseStage0").pipe_open_s == 100
    with pytest.raises(ConfigError, match="heartbeat_s .* must be below registry_ttl_s"):
        TimeoutsConfig.parse({"deployments": {"AudioEncoder": {"heartbeat_s": 30}}}).for_deployment("AudioEncoder")


def test_app_config_checks_deployment_names_and_moved_keys() -> None:
    with pytest.raises(AppConfigError, match=r"unknown deployment\(s\) \['DenoiseStage9'\]"):
        serve_config({**BASE, "timeouts": {"deployments": {"DenoiseStage9": {"pipe_open_s": 1}}}})
    with pytest.raises(ConfigError, match=r"app\.drain_timeout_s moved to app\.timeouts\.session_drain_s"):
        serve_config({**BASE, "drain_timeout_s": 60})
    with pytest.raises(AppConfigError, match=r"app\.handlers: unknown roles \['decoder'\]"):
        serve_config({**BASE, "handlers": {"decoder": "x:y"}})


def test_timeouts_reach_every_deployment() -> None:
    app = build_app({**BASE, "timeouts": {"session_drain_s": 42, "aas_wait_s": 77,
                                          "deployments": {"DenoiseStage1": {"aas_wait_s": 7}}}})
    gateway = app._bound_deployment
    assert gateway.init_args[0]["timeouts"]["session_drain_s"] == 42
    stages = {a._bound_deployment.name: a._bound_deployment for a in gateway.init_args[1:] if hasattr(a, "_bound_deployment")}
    spec, common = stages["DenoiseStage1"].init_args
    assert spec["handler_config"]["aas_wait_s"] == 7 and common["timeouts"]["session_drain_s"] == 42
    assert stages["DenoiseStage0"].init_args[0]["handler_config"]["aas_wait_s"] == 77


def test_launcher_rejects_bad_timeouts_before_starting_anything(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("app:\n  timeouts:\n    stage_start: 10\n")
    with pytest.raises(LauncherError, match=r"app\.timeouts\.stage_start: Extra inputs are not permitted"):
        load_config(bad)
    moved = tmp_path / "moved.yaml"
    moved.write_text("app:\n  startup_timeout_s: 300\n")
    with pytest.raises(LauncherError, match=r"app\.startup_timeout_s moved to app\.timeouts\.deploy_s"):
        load_config(moved)
