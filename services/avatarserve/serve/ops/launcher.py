"""`avatarserve up` / `avatarserve down`: the one-command local cluster.

`up` starts, in order: a redis-server (unless REDIS_URL is set), a Ray head (`ray start --head --block` in its own
process session, so `down` can stop exactly the processes it started and nothing else), then deploys the Serve
application declaratively (`app.deploy`: the avatar app with its application-level session autoscaling policy; the
ops dashboard is at `{http_address}{route_prefix}/ops/`), waits until it is RUNNING and the gRPC endpoint answers
health checks, and prints the addresses. Prometheus scrapes `127.0.0.1:{metrics_export_port}/metrics` (deploy/prometheus.yml).
What it started is recorded in a state file (default ~/.avatarserve/local-cluster.json).

While it waits, `up` shows what is happening on stderr: which replicas are ready out of how many and what each one
is doing (starting, importing, loading weights, ready: serve/control/startup.py), as a live display on a terminal and as
plain lines otherwise. Nothing in it has a wall-clock limit around model loading: every wait is a named key of
`app.timeouts` (serve/config.py), and a wait on a process fails at once when that process exits. On a real failure
it names the replica, its exception and its log file, stops what it started and exits non-zero.

API keys (`app.auth.mode: required`, the default): on its first start `up` creates an API key, stores only its hash
in Redis, prints the plain key once and writes it to `<state dir>/api-key` (mode 0600); later starts register the
same key again (the local redis-server keeps nothing across restarts), and `avatarserve stream` reads the file when no
key is given. TLS (`app.tls`): Ray Serve's gRPC proxy serves plaintext only, so `up` runs the TLS front
(serve/api/tls_front.py) in front of it and prints the front's address as `grpc_address`.

Ray >= 2.59 turns token authentication on for local clusters. The local cluster binds only to 127.0.0.1 and we set
RAY_AUTH_MODE=disabled deliberately for it (documented in the README); a multi-node deployment uses KubeRay.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from avatarserve.serve.config import AppConfig, ConfigError, TimeoutsConfig
from avatarserve.serve.ops.progress import ProgressDisplay

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "local.yaml"
STATE_DIR = Path(os.environ.get("AVATARSERVE_STATE_DIR", Path.home() / ".avatarserve"))
STATE_FILE = STATE_DIR / "local-cluster.json"


class LauncherError(RuntimeError):
    """The local cluster could not be started or stopped."""


# Ports the launcher picks for its servers lie outside the ranges other processes get ports from without asking: the
# kernel's ephemeral range (every bind to port 0, which Ray's own servers do while the cluster starts) and Ray's
# worker ports. A port from the ephemeral range was once taken by a Ray process between this check and Serve's
# proxy binding it ("Address already in use": the proxy never started).
_RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default min_worker_port..max_worker_port
_LINUX_EPHEMERAL_DEFAULT = range(32768, 61000)
_handed_out: set = set()  # ports this process already chose: two servers never get the same one
_port_rng = random.SystemRandom()  # not the global generator: a test seeding that must not make processes agree


def _ephemeral_ports() -> range:
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(lo, hi + 1)
    except (OSError, ValueError):
        return _LINUX_EPHEMERAL_DEFAULT


def _bindable(host: str, port: int) -> bool:
    """Can `port` be bound on `host` and on the wildcard addresses? (Serve's gRPC proxy binds [::] and 0.0.0.0.)"""
    addresses = [(socket.AF_INET, host), (socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        addresses.append((socket.AF_INET6, "::"))
    for family, address in addresses:
        try:
            with socket.socket(family) as s:
                s.bind((address, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                continue  # no IPv6 on this machine
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, chosen where neither the kernel nor Ray hands out ports by themselves (between
    Ray's worker ports and the ephemeral range, randomly); the kernel's choice where that gap is too small."""
    gap = range(_RAY_WORKER_PORTS.stop, _ephemeral_ports().start)
    for _ in range(200 if gap else 0):
        port = _port_rng.choice(gap)
        if port not in _handed_out and _bindable(host, port):
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port


def load_config(path: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.exists():
        raise LauncherError(f"deployment config {p} does not exist")
    with open(p) as fh:
        cfg = yaml.safe_load(fh) or {}
    if not isinstance(cfg, dict):
        raise LauncherError(f"{p}: expected a mapping at the top level")
    try:  # the whole app section is validated before anything starts
        cfg["app"] = AppConfig.parse(cfg.get("app"))
    except ConfigError as exc:
        raise LauncherError(f"{p}: {exc}") from exc
    cfg["_path"] = str(p)
    return cfg


DRAIN_POLL_S = 0.25  # how often `down` checks whether the drained streams have ended
DRAIN_FLAG_MARGIN_S = 60.0  # the drain flag outlives `down`'s wait by this much, then expires by itself


@dataclass
class ClusterState:
    config_path: str
    grpc_address: str
    http_address: str
    ray_address: str
    redis_url: str
    redis_pid: Optional[int] = None  # set only when we started redis-server
    ray_pgid: Optional[int] = None
    metrics_export_port: Optional[int] = None
    started_at: float = field(default_factory=time.time)
    app_name: str = "avatarserve"
    temp_dir: Optional[str] = None
    ops_url: Optional[str] = None
    api_key_file: Optional[str] = None  # the launcher's API key (0600), when auth is required
    tls_front_pid: Optional[int] = None  # set when we started the TLS front
    serve_grpc_address: Optional[str] = None  # the Serve proxy's plaintext address (behind the TLS front)

    def save(self, path: Path = STATE_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path = STATE_FILE) -> Optional["ClusterState"]:
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def _wait_port(host: str, port: int, timeout: float, what: str, proc: Optional[subprocess.Popen] = None,
               log: Optional[Path] = None, key: str = "") -> None:
    """Wait until `host:port` accepts connections; fail at once if `proc` exits, else after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _accepts(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise LauncherError(f"{what} exited with code {proc.returncode} before opening {host}:{port}"
                                + (f"; log: {log}\n{_tail(log)}" if log else ""))
        time.sleep(0.2)
    raise LauncherError(f"{what} did not open {host}:{port} within {timeout:.0f} s"
                        + (f" ({key})" if key else "") + (f"; log: {log}" if log else ""))


def _tail(path: Optional[Path], lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return ""


def start_redis(port: int, workdir: Path, timeout_s: float = 60.0) -> int:
    exe = shutil.which("redis-server")
    if exe is None:
        raise LauncherError("redis-server is not installed (apt-get install redis-server) and REDIS_URL is not set")
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--protected-mode", "yes"],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port("127.0.0.1", port, timeout_s, "redis-server", proc, log, "timeouts.redis_start_s")
    except LauncherError:
        _kill_pid(proc.pid)
        raise
    return proc.pid


RAY_SIGTERM_DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"  # read by ray/_private/ray_constants.py


def ray_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only local cluster, see module docstring
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray replaces 127.0.0.1 by the host's routable address unless it believes it runs a single-machine
    # cluster (its Windows/macOS mode); that switch keeps every Ray port on the loopback interface.
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # On SIGTERM, `ray start --block` first asks the GCS to drain its node and waits up to this long (Ray's default:
    # 30 s). Our nodes are stopped by signalling their whole process group, GCS included, so that request waits out
    # the full time for a GCS that is already gone, and `_kill_group` ends it with SIGKILL. `down` drains the streams
    # and shuts Serve down itself before it signals the node.
    env.setdefault(RAY_SIGTERM_DRAIN_ENV, "0")
    return env


# `ray start` waits a fixed 30 s for its raylet to register with the GCS (ray/_private/node.py; no setting changes it)
# and then exits with this text. It happened in CI on a busy 2-core machine: that node's raylet had written no log at
# all. Ray's own transient failure, so the node is started again (`timeouts.ray_start_attempts`).
RAY_NODE_STARTUP_TIMED_OUT = "The current node timed out during startup"
RAY_RUNTIME_STARTED = "Ray runtime started."  # what `ray start` prints once its node has registered


_TIMEOUTS = TimeoutsConfig()  # the defaults of `app.timeouts`, for callers without a deployment config


class RayNodeStartTimedOut(LauncherError):
    """`ray start` gave up on its raylet after Ray's fixed wait (transient: the node is started again)."""


def start_ray_node(cmd: List[str], log: Path, env: Dict[str, str], timeout_s: float = _TIMEOUTS.ray_start_s,
                   attempts: int = _TIMEOUTS.ray_start_attempts, what: str = "the Ray head",
                   listen: Optional[tuple[str, int]] = None) -> int:
    """Run `ray start --block ...` (`cmd`) in its own process session and return its pid (= process group) once it
    reports the runtime started and, for a head, `listen` (the GCS) accepts connections. Fails at once when `ray
    start` exits, after `timeout_s` otherwise; when Ray gives up on its raylet, the group is stopped and the node
    started again, `attempts` times in all."""
    attempt = 1
    while True:
        offset = log.stat().st_size if log.exists() else 0  # the log is appended to: read this attempt's part
        proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_ray_started(proc, log, offset, timeout_s, what, listen)
            return proc.pid
        except RayNodeStartTimedOut as exc:
            _kill_group(proc.pid)
            if attempt >= attempts:
                raise RayNodeStartTimedOut(f"{exc} ({attempts} attempts, timeouts.ray_start_attempts)") from None
            print(f"[up] {what}: Ray gave up on its raylet after its fixed 30 s wait (attempt {attempt} of "
                  f"{attempts}); starting it again. Log: {log}", file=sys.stderr)
            attempt += 1
        except BaseException:
            _kill_group(proc.pid)
            raise


def _wait_ray_started(proc: subprocess.Popen, log: Path, offset: int, timeout_s: float, what: str,
                      listen: Optional[tuple[str, int]]) -> None:
    deadline = time.monotonic() + timeout_s
    text = ""
    with open(log, "rb") as fh:  # this attempt's output, read as it grows
        fh.seek(offset)
        while True:
            text += fh.read().decode(errors="replace")
            if RAY_RUNTIME_STARTED in text and (listen is None or _accepts(*listen)):
                return
            code = proc.poll()
            if code is not None:
                text += fh.read().decode(errors="replace")
                tail = "\n".join(text.splitlines()[-15:])
                if RAY_NODE_STARTUP_TIMED_OUT in text:
                    raise RayNodeStartTimedOut(f"{what}: `ray start` exited with code {code}: its raylet did not "
                                               f"register within Ray's fixed wait; log: {log}\n{tail}")
                raise LauncherError(f"{what}: `ray start` exited with code {code}; log: {log}\n{tail}")
            if time.monotonic() > deadline:
                raise LauncherError(f"{what} did not start within {timeout_s:.0f} s (timeouts.ray_start_s); log: {log}")
            time.sleep(0.2)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_ray_head(cfg: Dict[str, Any], temp_dir: Path, metrics_port: int, timeout_s: float = _TIMEOUTS.ray_start_s,
                   attempts: int = _TIMEOUTS.ray_start_attempts) -> tuple[int, str]:
    """The local cluster's Ray head on 127.0.0.1, as the `cluster` section of the deployment config says; returns
    the pid of its `ray start` (its process group) and the GCS address."""
    cl = cfg.get("cluster", {})
    port = int(cl.get("ray_port") or free_port())
    num_cpus = cl.get("num_cpus") or os.cpu_count() or 2
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(num_cpus),
           "--num-gpus", str(cl.get("num_gpus", 0)), "--include-dashboard", str(bool(cl.get("dashboard", False))).lower(),
           "--disable-usage-stats", "--metrics-export-port", str(metrics_port), "--temp-dir", str(temp_dir)]
    resources = cl.get("resources")
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    if cl.get("object_store_memory"):  # bytes; Ray's default is 30% of the machine's memory
        cmd += ["--object-store-memory", str(int(cl["object_store_memory"]))]
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = ray_env()
    if cl.get("metrics_report_interval_ms"):  # how often replicas push metrics to the node's agent (Ray: 10 s)
        env["RAY_metrics_report_interval_ms"] = str(int(cl["metrics_report_interval_ms"]))
    pid = start_ray_node(cmd, temp_dir / "ray-head.log", env, timeout_s, attempts, "the Ray head",
                         listen=("127.0.0.1", port))
    return pid, f"127.0.0.1:{port}"


def _terminate(send, timeout: float, poll_s: float, pid: int) -> None:
    """SIGTERM via `send`, wait until the target is gone, SIGKILL if it outlives `timeout`. `pid` (the process, or
    the group's leader) is reaped when it is our own child, so it does not linger as a zombie."""
    try:
        send(signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        _reap(pid)
        try:
            send(0)
        except ProcessLookupError:
            return
        time.sleep(poll_s)
    try:
        send(signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (`down` from another process): its parent or init reaps it
        pass


def _kill_group(pgid: int, timeout: float = 25.0) -> None:
    _terminate(lambda sig: os.killpg(pgid, sig), timeout, 0.3, pgid)


def _kill_pid(pid: int, timeout: float = 10.0) -> None:
    _terminate(lambda sig: os.kill(pid, sig), timeout, 0.1, pid)


def use_ray_env() -> None:
    """Put `ray_env()`'s Ray variables into this process's environment (Ray reads some only when it is imported)."""
    os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_")})


def connect_driver(ray_address: str, namespace: str) -> None:
    """`ray.init` this process as a driver of a local cluster (its head on 127.0.0.1, started by `start_ray_head`)."""
    use_ray_env()
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:  # read once, when Ray was imported
        raise LauncherError("Ray was imported in this process before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: its "
                            f"driver would look for the cluster at {ray_address} on this host's routable address "
                            "instead of 127.0.0.1 and wait there; set the variable before importing Ray")
    ray.init(address=ray_address, log_to_driver=False, namespace=namespace)


def deploy_app(cfg: Dict[str, Any], ray_address: str, redis_url: str, grpc_port: int, http_port: int,
               progress: Optional[ProgressDisplay] = None) -> None:
    """Connect to the cluster and deploy the Serve app (driver exits afterwards; Serve keeps running)."""
    connect_driver(ray_address, "avatarserve")
    import ray

    from avatarserve.serve.builder import deploy, grpc_options, http_options
    from avatarserve.serve.ray_compat import start_serve

    try:
        start_serve(grpc_options=grpc_options(grpc_port), http_options=http_options(http_port))
        app: AppConfig = cfg["app"].model_copy(update={"redis_url": redis_url})
        try:
            deploy(app, timeout_s=app.timeouts.deploy_s, on_progress=progress.update if progress else None)
        except (ConfigError, TimeoutError) as exc:
            raise LauncherError(str(exc)) from exc
    finally:
        ray.shutdown()


API_KEY_FILE = "api-key"


def ensure_launcher_key(redis_url: str, namespace: str, key_file: Path) -> Optional[str]:
    """The launcher's API key: created on the first start (returned, to be printed once), written to `key_file`
    (0600) and stored hashed in Redis; on later starts registered again from the file (None returned)."""
    import asyncio

    from avatarserve.serve.control.api_keys import ApiKeyStore, make_record, parse_key

    created = None
    if key_file.exists():
        parsed = parse_key(key_file.read_text().strip())
        if parsed is None:
            raise LauncherError(f"{key_file} does not hold an API key (avs_<id>_<secret>); remove it to get a new one")
        rec, _ = make_record("avatarserve up", key_id=parsed[0], secret=parsed[1])
    else:
        rec, created = make_record("avatarserve up")
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(created + "\n")

    async def put() -> None:
        store = ApiKeyStore.from_url(redis_url, namespace=namespace)
        try:
            await store.put(rec, only_if_new=True)  # a key revoked in a persistent Redis stays revoked
        finally:
            await store.close()

    asyncio.run(put())
    return created


def start_tls_front(app: AppConfig, upstream: str, workdir: Path, timeout_s: float) -> tuple[int, int]:
    """Start the TLS front (serve/api/tls_front.py) before the Serve proxy at `upstream`: (pid, port)."""
    tls = app.tls
    port = tls.port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "tls-front.log"
    proc = subprocess.Popen([sys.executable, "-m", "avatarserve.serve.api.tls_front", "--upstream", upstream,
                             "--cert", str(tls.cert_file), "--key", str(tls.key_file), "--host", tls.host,
                             "--port", str(port)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port("127.0.0.1" if tls.host in ("0.0.0.0", "::") else tls.host, port, timeout_s, "the TLS front",
                   proc, log, "timeouts.health_s")
    except LauncherError:
        _kill_pid(proc.pid)
        raise
    return proc.pid, port


def wait_grpc_healthy(address: str, timeout: float = 120.0, application: str = "avatarserve") -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    err: Exception | None = None
    while time.time() < deadline:
        try:
            with grpc.insecure_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="avatarserve.v1.AvatarService"), timeout=5,
                    metadata=(("application", application),))
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            err = exc
        time.sleep(1.0)
    raise LauncherError(f"gRPC endpoint {address} not healthy after {timeout:.0f} s (timeouts.health_s): {err}")


def up(config_path: Optional[str] = None, *, state_file: Path = STATE_FILE, quiet: bool = False) -> int:
    existing = ClusterState.load(state_file)
    if existing is not None:
        raise LauncherError(f"a local cluster is already recorded in {state_file} (gRPC {existing.grpc_address}); "
                            "run `avatarserve down` first")
    cfg = load_config(config_path)
    app: AppConfig = cfg["app"]
    timeouts = app.timeouts
    cl = cfg.get("cluster", {})
    grpc_port = int(cl.get("grpc_port") or free_port())
    http_port = int(cl.get("http_port") or free_port())
    metrics_port = int(cl.get("metrics_export_port") or free_port())
    workdir = Path(cl.get("work_dir") or (state_file.parent / "run"))
    temp_dir = Path(cl.get("ray_temp_dir") or f"/tmp/avatarserve-ray-{os.getpid()}")
    redis_url = os.environ.get("REDIS_URL")
    redis_pid = None
    state = None
    try:
        if not redis_url:
            rport = int(cfg.get("redis", {}).get("port") or free_port())
            redis_pid = start_redis(rport, workdir, timeouts.redis_start_s)
            redis_url = f"redis://127.0.0.1:{rport}/0"
        else:
            undrain(redis_url, app.namespace)  # a drain left behind by a stopped cluster on this Redis
        ray_pgid, ray_address = start_ray_head(cfg, temp_dir, metrics_port, timeouts.ray_start_s,
                                               timeouts.ray_start_attempts)
        state = ClusterState(config_path=cfg["_path"], grpc_address=f"127.0.0.1:{grpc_port}",
                             http_address=f"http://127.0.0.1:{http_port}", ray_address=ray_address,
                             redis_url=redis_url, redis_pid=redis_pid, ray_pgid=ray_pgid,
                             metrics_export_port=metrics_port, temp_dir=str(temp_dir),
                             app_name=app.name,
                             ops_url=f"http://127.0.0.1:{http_port}{app.route_prefix}/ops/" if app.ops.enabled else None)
        state.save(state_file)  # record before deploying so `down` can clean up a half-started cluster
        created_key = None
        if app.auth.mode == "required":
            key_file = state_file.parent / API_KEY_FILE
            created_key = ensure_launcher_key(redis_url, app.namespace, key_file)
            state.api_key_file = str(key_file)
            state.save(state_file)
        deploy_app(cfg, ray_address, redis_url, grpc_port, http_port, progress=None if quiet else ProgressDisplay())
        wait_grpc_healthy(state.grpc_address, timeouts.health_s)
        if app.tls.enabled:
            state.serve_grpc_address = state.grpc_address
            state.tls_front_pid, tls_port = start_tls_front(app, state.serve_grpc_address, workdir, timeouts.health_s)
            state.grpc_address = f"127.0.0.1:{tls_port}"
            state.save(state_file)
    except BaseException:
        if state is not None:
            down(state_file=state_file, quiet=True)
        elif redis_pid:
            _kill_pid(redis_pid)
        raise
    if created_key and not quiet:  # the only time the plain key is shown
        print(f"[up] created API key {created_key}\n[up] saved to {state.api_key_file} (mode 0600); "
              "`avatarserve stream` reads it, other clients take AVATARSERVE_API_KEY", file=sys.stderr)
    if not quiet:
        print(json.dumps({"grpc_address": state.grpc_address, "http_address": state.http_address,
                          "ray_address": state.ray_address, "redis_url": state.redis_url,
                          "metrics_export_port": metrics_port, "ops_url": state.ops_url,
                          "state_file": str(state_file), "api_key_file": state.api_key_file,
                          "tls": app.tls.enabled, "serve_grpc_address": state.serve_grpc_address}))
    return 0


def _on_store(redis_url: str, namespace: str, work) -> Any:
    """Run `await work(store)` on a SessionStore of the cluster's Redis, from synchronous launcher code."""
    import asyncio

    from avatarserve.serve.control.session_store import SessionStore

    async def run() -> Any:
        store = SessionStore.from_url(redis_url, namespace=namespace)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


def drain_streams(redis_url: str, namespace: str, wait_s: float) -> Dict[str, Any]:
    """Drain the cluster that keeps its sessions under `namespace`: every open stream ends with END_OF_STREAM
    `server_draining` (after delivering what its client sent), new sessions and streams get UNAVAILABLE. Waits until
    no stream is open or `wait_s` passed. The flag outlives the wait by `DRAIN_FLAG_MARGIN_S` (then expires by
    itself); `undrain` clears it."""
    import asyncio

    async def drain(store) -> Dict[str, Any]:
        t0 = time.monotonic()
        await store.start_draining(wait_s + DRAIN_FLAG_MARGIN_S)
        while True:
            left = await store.open_streams()
            if not left or time.monotonic() - t0 >= wait_s:
                return {"open_streams_left": left, "drain_s": round(time.monotonic() - t0, 2)}
            await asyncio.sleep(DRAIN_POLL_S)

    return _on_store(redis_url, namespace, drain)


def undrain(redis_url: str, namespace: str) -> None:
    """Clear the drain flag (`up` on a Redis that a drained cluster used)."""
    _on_store(redis_url, namespace, lambda store: store.stop_draining())


def down(*, state_file: Path = STATE_FILE, quiet: bool = False) -> int:
    state = ClusterState.load(state_file)
    if state is None:
        if not quiet:
            print(json.dumps({"stopped": False, "reason": f"no local cluster recorded in {state_file}"}))
        return 0
    stopped: List[str] = []
    drained: Optional[Dict[str, Any]] = None
    namespace = None
    if state.ray_pgid and state.redis_url:
        try:  # open streams end with END_OF_STREAM server_draining, not with the replicas' death
            app = load_config(state.config_path)["app"]
            namespace = app.namespace
            drained = drain_streams(state.redis_url, namespace, app.timeouts.shutdown_drain_s)
        except Exception as exc:  # noqa: BLE001 - a cluster that cannot drain (Redis gone) is still stopped
            drained = {"error": f"{type(exc).__name__}: {exc}"}
    if state.tls_front_pid:
        _kill_pid(state.tls_front_pid)
        stopped.append("tls-front")
    if state.ray_pgid:
        try:  # graceful first: let Serve drain its replicas
            subprocess.run([sys.executable, "-c", (
                "import ray, sys\nfrom ray import serve\n"
                f"ray.init(address={state.ray_address!r}, log_to_driver=False)\nserve.shutdown()\n")],
                env=ray_env(), timeout=60, capture_output=True)
        except Exception:  # noqa: BLE001 - the process group is killed below anyway
            pass
        _kill_group(state.ray_pgid)
        stopped.append("ray")
    if state.redis_pid:
        _kill_pid(state.redis_pid)
        stopped.append("redis-server")
    if namespace is not None and not state.redis_pid and "error" not in drained:
        try:  # an external Redis outlives this cluster: the next one must not start drained
            undrain(state.redis_url, namespace)
        except Exception:  # noqa: BLE001 - the flag expires by itself
            pass
    state_file.unlink(missing_ok=True)
    if not quiet:
        print(json.dumps({"stopped": True, "processes": stopped, "drain": drained}))
    return 0
