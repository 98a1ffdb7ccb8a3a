"""The session autoscaling policy as a pure function, its Serve adapter, and the registry reservations it counts."""

from __future__ import annotations

import asyncio

import pytest

from avatarserve.serve.control.autoscale import (
    AutoscalePolicyError,
    DeploymentSessionPolicy,
    PolicyParams,
    SessionAutoscalingPolicy,
    StageLoad,
    decide,
    replicas_for,
)
from avatarserve.serve.control.registry import NoReplicaAvailableError, ReplicaInfo, ReplicaRegistry, RouteHop

from tests.conftest import RedisServer

STAGES = {"AudioEncoder": 4, "DenoiseStage0": 2, "VaeDecoder": 4}


def params(**kw) -> PolicyParams:
    base = dict(capacity=STAGES, headroom_fraction=0.0, headroom_sessions=0, hysteresis=0.25, downscale_stable_s=10.0)
    base.update(kw)
    return PolicyParams(**base)


def loads(held: dict, target: dict, lo: int = 1, hi: int = 8) -> dict:
    return {d: StageLoad(d, target[d], held[d], lo, hi) for d in held}


def same(n) -> dict:
    return dict.fromkeys(STAGES, n)


def test_replicas_for_headroom() -> None:
    assert replicas_for(0, 4, 0.0, 0) == 0
    assert replicas_for(0, 4, 0.2, 1) == 1  # an idle pool keeps one free slot
    assert replicas_for(4, 4, 0.0, 0) == 1
    assert replicas_for(4, 4, 0.0, 1) == 2  # full replica + one slot of headroom
    assert replicas_for(10, 4, 0.2, 1) == 3  # 12 slots
    assert replicas_for(7, 2, 0.5, 0) == 6  # 10.5 slots
    with pytest.raises(AutoscalePolicyError, match="sessions must be >= 0"):
        replicas_for(-1, 4, 0.0, 0)


def test_surge_scales_every_stage_at_once_by_its_own_capacity() -> None:
    targets, state = decide(loads(same(5), same(1)), 0, params(), {}, now=100.0)
    assert targets == {"AudioEncoder": 2, "DenoiseStage0": 3, "VaeDecoder": 2}
    assert all("down_since" not in s for s in state.values())


def test_measured_capacity_sizes_a_stage_but_never_above_the_configured_capacity() -> None:
    held = same(6)
    measured = {d: StageLoad(d, 1, 6, 1, 8, capacity=c) for d, c in
                {"AudioEncoder": 1.5, "DenoiseStage0": 3.0, "VaeDecoder": None}.items()}
    targets, _ = decide(measured, 0, params(), {}, now=100.0)
    # audio: 6 / 1.5 -> 4 (configured 4 would give 2); denoise: measured 3 is above the configured 2 -> 2 per
    # replica -> 3; VAE: nothing reported -> configured 4 -> 2
    assert targets == {"AudioEncoder": 4, "DenoiseStage0": 3, "VaeDecoder": 2}
    assert decide(loads(held, same(1)), 0, params(), {}, now=100.0)[0] == {"AudioEncoder": 2, "DenoiseStage0": 3,
                                                                            "VaeDecoder": 2}


def test_parked_admissions_count_as_demand_even_from_zero_replicas() -> None:
    p = params(scale_to_zero=True, scale_to_zero_after_s=5.0)
    targets, _ = decide(loads(same(0), same(0), lo=0), 3, p, {}, now=1.0)
    assert targets == {"AudioEncoder": 1, "DenoiseStage0": 2, "VaeDecoder": 1}


def test_downscale_waits_for_a_stable_window_and_uses_the_hysteresis_band() -> None:
    p = params()
    # 4 denoise replicas (8 slots). 6 sessions: up needs 3, down (band 1.25 -> 7.5 slots) needs 4: hold.
    t, st = decide(loads(same(6), same(4)), 0, p, {}, now=0.0)
    assert t["DenoiseStage0"] == 4 and "down_since" not in st["DenoiseStage0"]
    # 4 sessions: down needs 3 (5 slots): a shrink is wanted but not before downscale_stable_s.
    t, st = decide(loads(same(4), same(4)), 0, p, st, now=1.0)
    assert t["DenoiseStage0"] == 4 and st["DenoiseStage0"]["down_since"] == 1.0
    t, st = decide(loads(same(4), same(4)), 0, p, st, now=10.5)
    assert t["DenoiseStage0"] == 4
    t, st = decide(loads(same(4), same(4)), 0, p, st, now=11.0)
    assert t["DenoiseStage0"] == 3 and "down_since" not in st["DenoiseStage0"]
    # A rise inside the window resets it.
    t, st = decide(loads(same(1), same(3)), 0, p, st, now=12.0)
    assert t["DenoiseStage0"] == 3 and st["DenoiseStage0"]["down_since"] == 12.0
    t, st = decide(loads(same(5), same(3)), 0, p, st, now=13.0)
    assert "down_since" not in st["DenoiseStage0"]
    t, st = decide(loads(same(1), same(3)), 0, p, st, now=20.0)
    assert t["DenoiseStage0"] == 3 and st["DenoiseStage0"]["down_since"] == 20.0


def test_load_on_a_boundary_does_not_flap() -> None:
    p = params(downscale_stable_s=0.0)
    target, st = same(1), {}
    history = []
    for i, n in enumerate([2, 3, 2, 3, 2, 3, 2]):  # denoise capacity 2: 2 -> 1 replica, 3 -> 2
        t, st = decide(loads(same(n), target), 0, p, st, now=float(i))
        target = t
        history.append(t["DenoiseStage0"])
    assert history == [1, 2, 2, 2, 2, 2, 2]  # grows once, then the band (2 * 1.25 = 2.5 slots) keeps 2


def test_scale_to_zero_only_when_enabled_and_idle_long_enough() -> None:
    off = params()
    t, _ = decide(loads(same(0), same(1), lo=0), 0, off, {}, now=1e6)
    assert t == same(1)
    on = params(scale_to_zero=True, scale_to_zero_after_s=60.0, downscale_stable_s=0.0)
    t, st = decide(loads(same(0), same(1), lo=0), 0, on, {}, now=100.0)
    assert t == same(1) and st["VaeDecoder"]["idle_since"] == 100.0
    t, st = decide(loads(same(0), same(1), lo=0), 0, on, st, now=159.0)
    assert t == same(1)
    t, st = decide(loads(same(0), same(1), lo=0), 0, on, st, now=160.0)
    assert t == same(0)
    t, st = decide(loads(same(0), same(0), lo=0), 1, on, st, now=161.0)  # a waiting session wakes it
    assert t == {"AudioEncoder": 1, "DenoiseStage0": 1, "VaeDecoder": 1} and "idle_since" not in st["AudioEncoder"]


def test_bounds_and_unmanaged_deployments() -> None:
    ls = loads(same(40), same(1), lo=2, hi=5)
    ls["Gateway"] = StageLoad("Gateway", 1, 0)
    t, _ = decide(ls, 0, params(), {}, now=0.0)
    assert t == same(5)  # clamped to max; the gateway is not sized
    t, _ = decide(loads(same(0), same(3), lo=2, hi=5), 0, params(downscale_stable_s=0), {}, now=0.0)
    assert t == same(2)  # clamped to min


@pytest.mark.parametrize("bad, match", [
    (dict(capacity={}), "at least one"),
    (dict(capacity={"A": 0}), "integer >= 1"),
    (dict(capacity={"A": 1.5}), "integer >= 1"),
    (dict(capacity={"A": 1}, headroom_fraction=-0.1), "must be >= 0"),
    (dict(capacity={"A": 1}, headroom_sessions=-1), "headroom_sessions"),
    (dict(capacity={"Gateway": 1}), "cannot also be a sized stage"),
])
def test_params_are_validated(bad, match) -> None:
    with pytest.raises(AutoscalePolicyError, match=match):
        PolicyParams(**bad)
    with pytest.raises(AutoscalePolicyError, match="unknown autoscaling policy parameters"):
        PolicyParams.from_dict({"capacity": {"A": 1}, "headroom": 1})


def _ctx(name: str, target: int, metrics: dict, running: list, state=None, now=1000.0, lo=1, hi=8):
    from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name=name, app_name="app")
    rids = {r: ReplicaID(unique_id=r, deployment_id=dep) for r in {*running, *[r for m in metrics.values() for r in m]}}
    raw = {metric: {rids[r]: [TimeStampedValue(now - 2, old), TimeStampedValue(now - 1, new)] for r, (old, new) in per.items()}
           for metric, per in metrics.items()}
    return dep, AutoscalingContext(
        deployment_id=dep, deployment_name=name, app_name="app", current_num_replicas=len(running),
        target_num_replicas=target, running_replicas=[rids[r] for r in running], total_num_requests=0.0,
        total_queued_requests=0.0, aggregated_metrics=None, raw_metrics=raw, capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now, config=None)


def test_serve_adapter_reads_newest_values_of_running_replicas_only() -> None:
    policy = SessionAutoscalingPolicy(**{"capacity": {"DenoiseStage0": 2, "VaeDecoder": 4}, "headroom_fraction": 0.0,
                                         "headroom_sessions": 0, "hysteresis": 0.0, "downscale_stable_s": 0.0})
    # r1 held 0 -> 2 sessions, r2 1 -> 2; r3 is stopping (not running): its 2 draining sessions need no slot.
    den_id, den = _ctx("DenoiseStage0", 2, {"held_sessions": {"r1": (0, 2), "r2": (1, 2), "r3": (2, 2)}}, ["r1", "r2"])
    vae_id, vae = _ctx("VaeDecoder", 1, {"held_sessions": {"v1": (1, 4)}}, ["v1"])
    gw_id, gw = _ctx("Gateway", 1, {"waiting_sessions": {"g1": (0, 1)}}, ["g1"])
    decisions, states = policy({den_id: den, vae_id: vae, gw_id: gw})
    assert decisions == {den_id: 3, vae_id: 2}  # (4 + 1 waiting) / 2 -> 3 ; (4 + 1) / 4 -> 2
    # The VAE replica measured that it serves 2 sessions in real time (its newest report; below the configured 4).
    vae_id, vae = _ctx("VaeDecoder", 1, {"held_sessions": {"v1": (1, 4)}, "session_capacity": {"v1": (4, 2)}},
                       ["v1"])
    decisions, _ = policy({den_id: den, vae_id: vae, gw_id: gw})
    assert decisions == {den_id: 3, vae_id: 3}  # (4 + 1) / 2 -> 3
    assert set(states) == {den_id, vae_id}
    # The deployment-level fallback sees only its own sessions.
    fallback = DeploymentSessionPolicy(capacity={"DenoiseStage0": 2}, headroom_fraction=0.0, headroom_sessions=0)
    assert fallback(den)[0] == 2
    assert fallback(gw) == (1, {})


# ------------------------------------------------------------------------------ reservations (the capacity signal)
def _info(rid: str, live: int, cap: int, dep: str = "DenoiseStage0", sessions=()) -> ReplicaInfo:
    return ReplicaInfo(dep, rid, f"127.0.0.1:{6000 + int(rid[-1])}", live_sessions=live, capacity=cap,
                       session_ids=tuple(sessions))


async def test_reservations_survive_heartbeats_until_the_session_opens(redis_server: RedisServer, redis_namespace: str) -> None:
    async with ReplicaRegistry.from_url(redis_server.url, namespace=redis_namespace, ttl_s=5.0) as reg:
        await reg.register(_info("r1", 0, 2))
        a = await reg.pick_least_loaded("DenoiseStage0", session_id="sess-a")
        b = await reg.pick_least_loaded("DenoiseStage0", session_id="sess-b")
        assert (a.replica_id, a.live_sessions, b.live_sessions) == ("r1", 1, 2)
        # The replica heartbeats with no live session: the reservations are not overwritten.
        _, reserved = await reg.heartbeat(_info("r1", 0, 2))
        assert reserved == 2
        with pytest.raises(NoReplicaAvailableError, match="at capacity") as err:
            await reg.pick_least_loaded("DenoiseStage0", session_id="sess-c")
        assert (err.value.deployment, err.value.registered) == ("DenoiseStage0", 1)
        # sess-a opens its stream: the replica reports it live, its reservation becomes a live slot.
        _, reserved = await reg.heartbeat(_info("r1", 1, 2, sessions=["sess-a"]))
        assert reserved == 1
        (rec,) = await reg.replicas("DenoiseStage0")
        assert (rec.live_sessions, rec.reserved) == (2, 1)
        # sess-b is closed before streaming: its slot comes back at once.
        await reg.release("sess-b", [RouteHop("DenoiseStage0", "r1", rec.address)])
        assert (await reg.pick_least_loaded("DenoiseStage0", session_id="sess-c")).replica_id == "r1"


async def test_reservations_expire(redis_server: RedisServer, redis_namespace: str) -> None:
    async with ReplicaRegistry.from_url(redis_server.url, namespace=redis_namespace, ttl_s=5.0,
                                        reservation_ttl_s=0.2) as reg:
        await reg.register(_info("r1", 0, 1))
        await reg.pick_least_loaded("DenoiseStage0", session_id="never-streams")
        with pytest.raises(NoReplicaAvailableError):
            await reg.pick_least_loaded("DenoiseStage0", session_id="other")
        await asyncio.sleep(0.3)
        assert (await reg.pick_least_loaded("DenoiseStage0", session_id="other")).replica_id == "r1"


async def test_route_reservation_is_all_or_nothing_and_revalidated(redis_server: RedisServer, redis_namespace: str) -> None:
    deps = ["AudioEncoder", "DenoiseStage0", "VaeDecoder"]
    async with ReplicaRegistry.from_url(redis_server.url, namespace=redis_namespace, ttl_s=5.0) as reg:
        await reg.register(_info("a1", 0, 4, dep="AudioEncoder"))
        await reg.register(_info("d1", 0, 1, dep="DenoiseStage0"))
        await reg.register(_info("v1", 0, 4, dep="VaeDecoder"))
        route = await reg.reserve_route(deps, "s1")
        assert [(h.deployment, h.replica_id) for h in route] == list(zip(deps, ["a1", "d1", "v1"]))
        with pytest.raises(NoReplicaAvailableError, match="'DenoiseStage0' is at capacity") as err:
            await reg.reserve_route(deps, "s2")
        assert err.value.full == {"DenoiseStage0": 1}
        await reg.deregister("VaeDecoder", "v1")  # every failing deployment is reported, not only the first
        with pytest.raises(NoReplicaAvailableError, match="no live replica of 'VaeDecoder'") as err:
            await reg.reserve_route(deps, "s2")
        assert err.value.full == {"DenoiseStage0": 1, "VaeDecoder": 0}
        await reg.register(_info("v1", 0, 4, dep="VaeDecoder"))
        # Nothing was reserved for s2 on the stages before the full one.
        assert {r.replica_id: r.reserved for r in await reg.replicas("AudioEncoder")} == {"a1": 1}
        # A second stream of s1 keeps its slots; after d1 goes away (scale-down) that hop is reported gone.
        check = await reg.reserve_route_hops("s1", route)
        assert (len(check.ok), check.gone, check.full) == (3, [], [])
        await reg.deregister("DenoiseStage0", "d1")
        await reg.register(_info("d2", 1, 1, dep="DenoiseStage0"))
        check = await reg.reserve_route_hops("s1", route)
        assert [h.replica_id for h in check.gone] == ["d1"] and len(check.ok) == 2
        with pytest.raises(NoReplicaAvailableError, match="at capacity"):
            await reg.pick_least_loaded("DenoiseStage0", session_id="s1", exclude="d1")
