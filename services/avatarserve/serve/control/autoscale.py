"""Session-driven autoscaling: one application-level Ray Serve policy that sizes every stage from live sessions.

Signal. Every stage replica reports `held_sessions` (sessions live on it + admissions reserved on it and not yet
streaming) through `record_autoscaling_stats`; every gateway replica reports `waiting_sessions` (CreateSession calls
parked because no replica had a free slot). The demand on stage k is

    D_k = sum of held_sessions over the running replicas of k  +  sum of waiting_sessions over the gateways

Sessions on a replica that Serve is stopping are not counted: they are draining (they never move) and need no slot on
the replicas that stay.

Sizing. With `capacity_k` sessions per replica of stage k (per stage: a VAE replica may hold more sessions than a
denoising stage), the slots wanted are `max(D * (1 + headroom_fraction), D + headroom_sessions)`, so

    up_k   = ceil(slots(D_k, headroom_fraction) / capacity_k)
    down_k = ceil(slots(D_k, headroom_fraction + hysteresis) / capacity_k)      (down_k >= up_k)

A deployment grows to `up_k` at once (a surge must get capacity now); it shrinks only to `down_k` (a wider band, so
a load sitting on a boundary does not flap) and only after `down_k` stayed below the current target for
`downscale_stable_s`. With `scale_to_zero`, a deployment with no demand for `scale_to_zero_after_s` goes to 0 replicas
(a waiting session brings it back: the gateway parks the call and reports it). Serve then applies each deployment's
`min_replicas`/`max_replicas` (and its delays, which the app builder sets to 0 because this policy owns the timing).

`capacity_k` is what the replicas of k report as `session_capacity` (the mean over the running ones): the real-time
sessions their measured step cost allows (`scheduling.admit_by: measured`, the same number admission places by), at
most the configured `capacity.<role>`, which is used as it is before any replica reported.

`decide()` is a pure function of plain values (unit-tested); `SessionAutoscalingPolicy` adapts Serve's
`AutoscalingContext`s to it. This module is pickled by value into the Serve controller: keep it free of heavy imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = [
    "AutoscalePolicyError",
    "CAPACITY_METRIC",
    "DeploymentSessionPolicy",
    "HELD_SESSIONS_METRIC",
    "LIVE_SESSIONS_METRIC",
    "PolicyParams",
    "SessionAutoscalingPolicy",
    "StageLoad",
    "WAITING_SESSIONS_METRIC",
    "decide",
    "replicas_for",
]

LIVE_SESSIONS_METRIC = "live_sessions"
HELD_SESSIONS_METRIC = "held_sessions"
CAPACITY_METRIC = "session_capacity"  # sessions one replica takes now (measured, or configured)
WAITING_SESSIONS_METRIC = "waiting_sessions"

_EPS = 1e-9


class AutoscalePolicyError(ValueError):
    """Invalid autoscaling policy parameters."""


@dataclass(frozen=True)
class PolicyParams:
    capacity: Mapping[str, int]  # deployment -> sessions per replica; only these deployments are sized
    headroom_fraction: float = 0.2
    headroom_sessions: int = 1
    hysteresis: float = 0.2
    downscale_stable_s: float = 30.0
    scale_to_zero: bool = False
    scale_to_zero_after_s: float = 300.0
    gateway: str = "Gateway"  # deployment whose replicas report waiting_sessions

    def __post_init__(self) -> None:
        if not self.capacity:
            raise AutoscalePolicyError("capacity must name at least one deployment")
        for dep, cap in self.capacity.items():
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
                raise AutoscalePolicyError(f"capacity of {dep!r} must be an integer >= 1, got {cap!r}")
        if self.headroom_fraction < 0 or self.hysteresis < 0:
            raise AutoscalePolicyError(f"headroom_fraction ({self.headroom_fraction}) and hysteresis ({self.hysteresis}) "
                                       "must be >= 0")
        if self.headroom_sessions < 0:
            raise AutoscalePolicyError(f"headroom_sessions must be >= 0, got {self.headroom_sessions}")
        if self.downscale_stable_s < 0 or self.scale_to_zero_after_s < 0:
            raise AutoscalePolicyError("downscale_stable_s and scale_to_zero_after_s must be >= 0")
        if self.gateway in self.capacity:
            raise AutoscalePolicyError(f"the gateway deployment {self.gateway!r} cannot also be a sized stage")

    @classmethod
    def for_app(cls, app: Any) -> "PolicyParams":
        """The parameters of an application config (`AppConfig` or its mapping): capacity per stage deployment
        from `capacity` (per role), the rest from `autoscaling`."""
        from avatarserve.serve.config import AppConfig

        app = AppConfig.parse(app)
        a = app.autoscaling
        return cls(capacity={dep: getattr(app.capacity, app.role_of(dep)) for dep in app.stage_deployments},
                   headroom_fraction=a.headroom_fraction, headroom_sessions=a.headroom_sessions,
                   hysteresis=a.hysteresis, downscale_stable_s=a.downscale_stable_s, scale_to_zero=a.scale_to_zero,
                   scale_to_zero_after_s=a.scale_to_zero_after_s, gateway="Gateway")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PolicyParams":
        """Explicit parameters, or `{"app": <application args>}` (what serve_config and the Helm chart emit: the
        policy reads the same config as the application, so nothing is derived twice)."""
        if "app" in d:
            if len(d) != 1:
                raise AutoscalePolicyError(f"'app' excludes other policy parameters, got {sorted(d)}")
            try:
                return cls.for_app(d["app"])
            except ValueError as exc:  # ConfigError
                raise AutoscalePolicyError(f"autoscaling policy: {exc}") from exc
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise AutoscalePolicyError(f"unknown autoscaling policy parameters {sorted(unknown)}; known: {sorted(known)}")
        if "capacity" not in d:
            raise AutoscalePolicyError("autoscaling policy parameters need 'capacity'")
        return cls(**{**d, "capacity": {str(k): v for k, v in dict(d["capacity"]).items()}})


@dataclass(frozen=True)
class StageLoad:
    """What the policy knows about one sized deployment at one tick."""

    deployment: str
    target_replicas: int  # Serve's current target
    held_sessions: float  # summed over running replicas
    min_replicas: int = 0
    max_replicas: int = 1_000_000
    capacity: Optional[float] = None  # sessions per replica as its replicas report it (mean); None: none reported


def replicas_for(sessions: float, capacity: float, headroom_fraction: float, headroom_sessions: int) -> int:
    """Replicas needed to hold `sessions` with headroom (0 only when there is nothing to hold and no headroom)."""
    if sessions < 0:
        raise AutoscalePolicyError(f"sessions must be >= 0, got {sessions}")
    slots = max(sessions * (1.0 + headroom_fraction), sessions + headroom_sessions)
    return max(0, math.ceil(slots / capacity - _EPS))


def decide(loads: Mapping[str, StageLoad], waiting_sessions: float, params: PolicyParams,
           state: Mapping[str, Mapping[str, Any]], now: float) -> Tuple[Dict[str, int], Dict[str, Dict[str, Any]]]:
    """Target replicas per sized deployment, and the new per-deployment policy state.

    `state[dep]` may hold `down_since` (when shrinking first became possible) and `idle_since` (when demand first
    dropped to zero); both are wall-clock seconds like `now`.
    """
    targets: Dict[str, int] = {}
    new_state: Dict[str, Dict[str, Any]] = {}
    for dep, load in loads.items():
        cap = params.capacity.get(dep)
        if cap is None:
            continue  # not ours to size
        if load.capacity is not None and load.capacity >= 1:  # measured: never above the configured bound
            cap = min(cap, load.capacity)
        st = dict(state.get(dep) or {})
        demand = max(0.0, float(load.held_sessions)) + max(0.0, float(waiting_sessions))
        up = replicas_for(demand, cap, params.headroom_fraction, params.headroom_sessions)
        down = replicas_for(demand, cap, params.headroom_fraction + params.hysteresis, params.headroom_sessions)
        cur = load.target_replicas
        if up > cur:
            new = up
            st.pop("down_since", None)
        elif down < cur:
            since = st.setdefault("down_since", now)
            if now - since + _EPS >= params.downscale_stable_s:
                new = down
                st.pop("down_since", None)
            else:
                new = cur
        else:
            new = cur
            st.pop("down_since", None)
        if demand > 0:
            st.pop("idle_since", None)
            new = max(new, 1)
        else:
            idle_since = st.setdefault("idle_since", now)
            if not (params.scale_to_zero and now - idle_since + _EPS >= params.scale_to_zero_after_s):
                new = max(new, 1)
        new = min(max(new, load.min_replicas), load.max_replicas)
        targets[dep] = new
        new_state[dep] = st
    return targets, new_state


def _latest(series: Any) -> Optional[float]:
    """Newest value of a Serve TimeSeries (list of TimeStampedValue), or None."""
    if not series:
        return None
    newest = max(series, key=lambda p: p.timestamp)
    return float(newest.value)


def _metric_sum(ctx: Any, name: str) -> float:
    """Sum over the running replicas of the newest reported value of a custom metric."""
    raw = ctx.raw_metrics or {}
    per_replica = raw.get(name)
    total = 0.0
    if per_replica:
        running = set(ctx.running_replicas or ())
        for rid, series in per_replica.items():
            if running and rid not in running:
                continue
            v = _latest(series)
            if v is not None:
                total += v
        return total
    agg = (ctx.aggregated_metrics or {}).get(name) or {}
    return float(sum(agg.values()))


def _metric_mean(ctx: Any, name: str) -> Optional[float]:
    """Mean over the running replicas of the newest reported value of a custom metric; None if none reported."""
    per_replica = (ctx.raw_metrics or {}).get(name) or {}
    running = set(ctx.running_replicas or ())
    values = [v for rid, series in per_replica.items() if not running or rid in running
              for v in [_latest(series)] if v is not None]
    return sum(values) / len(values) if values else None


class SessionAutoscalingPolicy:
    """Application-level policy for Ray Serve (`autoscaling_policy: {policy_function: "...:SessionAutoscalingPolicy",
    policy_kwargs: {...}}`). Serve instantiates it once with `policy_kwargs` and calls it every control-loop tick with
    `{DeploymentID: AutoscalingContext}`; it returns `({DeploymentID: replicas}, {DeploymentID: state})`."""

    def __init__(self, **policy_kwargs: Any) -> None:
        self.params = PolicyParams.from_dict(policy_kwargs)

    def __call__(self, contexts: Mapping[Any, Any]) -> Tuple[Dict[Any, int], Dict[Any, Dict[str, Any]]]:
        by_name = {ctx.deployment_name: (dep_id, ctx) for dep_id, ctx in contexts.items()}
        waiting = 0.0
        if self.params.gateway in by_name:
            waiting = _metric_sum(by_name[self.params.gateway][1], WAITING_SESSIONS_METRIC)
        loads: Dict[str, StageLoad] = {}
        state: Dict[str, Mapping[str, Any]] = {}
        now = 0.0
        for name, (dep_id, ctx) in by_name.items():
            if name not in self.params.capacity:
                continue
            now = max(now, float(ctx.current_time or 0.0))
            loads[name] = StageLoad(deployment=name, target_replicas=int(ctx.target_num_replicas),
                                    held_sessions=_metric_sum(ctx, HELD_SESSIONS_METRIC),
                                    min_replicas=int(ctx.capacity_adjusted_min_replicas),
                                    max_replicas=int(ctx.capacity_adjusted_max_replicas),
                                    capacity=_metric_mean(ctx, CAPACITY_METRIC))
            state[name] = {k: v for k, v in (ctx.policy_state or {}).items() if k in ("down_since", "idle_since")}
        if not now:
            import time

            now = time.time()
        targets, new_state = decide(loads, waiting, self.params, state, now)
        decisions = {by_name[name][0]: n for name, n in targets.items()}
        states = {by_name[name][0]: st for name, st in new_state.items()}
        return decisions, states


class DeploymentSessionPolicy:
    """Deployment-level fallback of `SessionAutoscalingPolicy`, for the imperative `serve.run` path (where Serve cannot
    attach an application-level policy): sizes one deployment from its own held sessions (no gateway waiting signal,
    so a parked admission does not bring capacity by itself; the declarative path does)."""

    def __init__(self, **policy_kwargs: Any) -> None:
        self.params = PolicyParams.from_dict(policy_kwargs)

    def __call__(self, ctx: Any) -> Tuple[int, Dict[str, Any]]:
        import time

        name = ctx.deployment_name
        if name not in self.params.capacity:  # e.g. the gateway: keep Serve's current target
            return int(ctx.target_num_replicas), {}
        load = StageLoad(name, int(ctx.target_num_replicas), _metric_sum(ctx, HELD_SESSIONS_METRIC),
                         int(ctx.capacity_adjusted_min_replicas), int(ctx.capacity_adjusted_max_replicas),
                         capacity=_metric_mean(ctx, CAPACITY_METRIC))
        state = {k: v for k, v in (ctx.policy_state or {}).items() if k in ("down_since", "idle_since")}
        targets, new_state = decide({name: load}, 0.0, self.params, {name: state}, float(ctx.current_time or time.time()))
        return targets[name], new_state[name]
