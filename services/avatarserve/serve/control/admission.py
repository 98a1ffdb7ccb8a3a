"""Admission and placement of sessions on stage replicas.

CreateSession reserves a slot on one replica of every stage in one atomic step (control/registry.py). When a stage
has no free slot: if the deployment can still grow (autoscaling on and fewer live replicas than its max), the call is
parked for up to `timeouts.admission_wait_s` and counted in `waiting`, which the gateway reports as its custom
autoscaling metric so the application-level policy (control/autoscale.py) adds it to the demand: the surge itself
brings the capacity. Otherwise (or when the wait runs out) it is refused with `AdmissionRefused`, which the API maps
to RESOURCE_EXHAUSTED with a `retry-after-ms` hint. Admitted sessions keep their slots until their stream opens
(then they count as live) or they close.

Admission limit: a stage deployment never holds more admitted sessions than its maximum size allows (max replicas x
capacity per replica; the fixed replica count without autoscaling). Every session not yet closed counts, streaming or
not (an IDLE session keeps its promise of capacity), in `admitted:{deployment}` of the registry; CreateSession beyond
it is refused at once (RESOURCE_EXHAUSTED: growing cannot help), in the same atomic step that reserves the slots.

Sessions per replica (`replica_capacity`): with `scheduling.admit_by: measured` (the default) a stage replica
registers the real-time sessions its measured step cost allows (engine/scheduler.py `realtime_capacity`), between 1
and the configured `capacity.<role>`; so a replica whose forwards got slower (a busier machine, longer sessions)
takes no new session it could not serve in real time, while the sessions it has go on. A replica times itself on
synthetic sessions while it starts (phase "measuring"), so a burst of sessions at start-up is already admitted by
measurement; if that fails it registers the configured number until its first blocks.

A new stream re-validates the recorded route (`place_route`): a hop whose replica is gone (crashed, or stopped by a
scale-down) or full is re-placed on another replica (the pipeline state is rebuilt per stream from the session
store, so an idle session moves freely; a streaming session never moves: a stopping replica drains it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Dict, List, Optional, TypeVar

from avatarserve.serve.config import AppConfig
from avatarserve.serve.control.registry import NoReplicaAvailableError, ReplicaRegistry, RouteHop

__all__ = ["Admission", "AdmissionRefused", "replica_capacity"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def replica_capacity(configured: int, measured: Optional[int], admit_by: str) -> int:
    """Sessions a stage replica takes: its measured real-time capacity within [1, configured] (`admit_by`
    "measured", once measured), else the configured number."""
    if admit_by != "measured" or measured is None:
        return configured
    return max(1, min(configured, int(measured)))


class AdmissionRefused(Exception):
    """No capacity for a session now; retry after `retry_after_ms`."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Admission:
    """Admission policy of one gateway replica (its counters are per replica)."""

    def __init__(self, app: AppConfig, *, on_wait: Optional[Callable[[str, float], None]] = None,
                 on_reroute: Optional[Callable[[str], None]] = None):
        self.app = app
        self.deployments = app.stage_deployments
        auto = app.autoscaling
        self.autoscaling = auto.enabled
        self.max_replicas: Dict[str, int] = {}
        self.min_replicas: Dict[str, int] = {}
        for dep in self.deployments:
            role = app.role_of(dep)
            fixed = getattr(app.replicas, role)
            self.max_replicas[dep] = auto.max_of(role, app.replicas) if auto.enabled else fixed
            self.min_replicas[dep] = auto.min_of(role, app.replicas) if auto.enabled else fixed
        # deployment -> the most sessions it may hold admitted at once: its maximum size x sessions per replica
        self.limits: Dict[str, int] = {dep: self.max_replicas[dep] * getattr(app.capacity, app.role_of(dep))
                                       for dep in self.deployments}
        self.waiting = 0  # CreateSession calls parked for a slot (the custom autoscaling metric)
        self._on_wait = on_wait
        self._on_reroute = on_reroute

    def may_scale_to_zero(self, deployment: str) -> bool:
        """A stage scaled to zero is healthy: a session brings a replica back (admission parks meanwhile)."""
        return self.autoscaling and self.min_replicas.get(deployment, 1) == 0

    def can_grow(self, exc: NoReplicaAvailableError) -> bool:
        """May capacity still appear on every deployment that is full? (autoscaling on and each below its max)."""
        if not self.autoscaling or exc.at_limit:
            return False
        return all(self.max_replicas.get(dep) is None or registered < self.max_replicas[dep]
                   for dep, registered in exc.full.items())

    async def admit(self, place: Callable[[], Awaitable[T]]) -> T:
        """Run `place()` (a registry reservation) until it succeeds; park while the cluster can grow, else refuse."""
        wait_s = self.app.timeouts.admission_wait_s
        started = time.monotonic()
        deadline = started + wait_s
        parked = False
        try:
            while True:
                try:
                    result = await place()
                    self._observe("admitted", time.monotonic() - started)
                    return result
                except NoReplicaAvailableError as exc:
                    grow = self.can_grow(exc)
                    if not grow or time.monotonic() >= deadline:
                        self._observe("refused", time.monotonic() - started)
                        why = ("at its maximum size" if not grow or exc.at_limit
                               else f"still full after waiting {wait_s:g} s for it to grow")
                        raise AdmissionRefused(f"no capacity for a new session: {exc}; the cluster is {why}",
                                               self.app.retry_after_ms) from exc
                    if not parked:
                        parked = True
                        self.waiting += 1
                    await asyncio.sleep(self.app.admission_poll_s)
        finally:
            if parked:
                self.waiting -= 1

    async def reserve_route(self, registry: ReplicaRegistry, session_id: str) -> List[RouteHop]:
        return await self.admit(lambda: registry.reserve_route(self.deployments, session_id, limits=self.limits,
                                                                admitted_ttl_s=self.app.timeouts.session_ttl_s))

    async def place_route(self, registry: ReplicaRegistry, session_id: str, route: List[RouteHop]) -> List[RouteHop]:
        """Keep this session's slot on every hop of its recorded route that still stands; re-place the others."""
        check = await registry.reserve_route_hops(session_id, route)
        bad = {(h.deployment, h.replica_id) for h in check.gone + check.full}
        if not bad:
            return route
        new_route: List[RouteHop] = []
        for hop in route:
            if (hop.deployment, hop.replica_id) not in bad:
                new_route.append(hop)
                continue
            info = await self.admit(lambda d=hop.deployment, r=hop.replica_id: registry.pick_least_loaded(
                d, reserve=True, session_id=session_id, exclude=r))
            new_route.append(RouteHop(hop.deployment, info.replica_id, info.address))
            if self._on_reroute is not None:
                self._on_reroute(hop.deployment)
            log.info("session %s: %s moves from replica %s to %s", session_id, hop.deployment, hop.replica_id,
                     info.replica_id)
        await registry.record_route(session_id, new_route, ttl_s=self.app.timeouts.session_ttl_s)
        return new_route

    def _observe(self, outcome: str, seconds: float) -> None:
        if self._on_wait is not None:
            self._on_wait(outcome, seconds)
