"""The serving layer: Ray Serve deployments around the engine, by plane.

- `api/`          the public AvatarService (the servicer, the per-stream controller, ApiError -> gRPC status)
- `control/`      the control plane: replica registry, admission, autoscaling policy, session store, startup records
- `dataplane/`    per-session gRPC pipes between stage replicas, the stage host, stage specs, engine handlers, media
- `deployments/`  the Ray Serve deployment classes only
- `ops/`          metrics, the ops dashboard, deploy progress, the local launcher (`avatarserve up/down`)
- `config.py`     the typed application config (`AppConfig`, `TimeoutsConfig`); `builder.py` turns it into the Serve
                  application / Serve config; `ray_compat.py` holds the Ray Serve internals we touch

Imports run one way: deployments -> api / dataplane / control -> config; ops reads all of them; nothing here is
imported by engine/ or model/.
"""
