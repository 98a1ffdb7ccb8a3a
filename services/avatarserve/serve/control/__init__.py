"""The control plane: where sessions may run and what survives a replica. `registry` (replicas, reservations,
routes in Redis), `admission` (reserve / park / refuse, re-place a route), `autoscale` (the session-driven Serve
policy), `session_store` (every Redis key of a session), `startup` (what each replica is doing while it starts)."""
