"""A real multi-node Ray cluster on this one machine: a head plus worker nodes, each started with `ray start` and its
own `--node-ip-address` in the loopback range (127.0.0.2, 127.0.0.3, ...), each offering its own custom resource so
that a deployment can be forced onto it.

Ray treats 127.0.0.1 / localhost as "this host" and swaps it for the machine's routable address in a multi-node
cluster, so no node uses 127.0.0.1 (the head is 127.0.0.2); and the launcher's single-machine switch
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which refuses worker nodes) is turned off here.

Every node is a `ray start --block` in its own process group; `stop()` ends exactly those groups (never `ray stop`,
which would end every Ray process on the machine). The cluster's environment (RAY_CLUSTER_NAME, REDIS_URL,
REDIS_PASSWORD) reaches every node, as KubeRay's pod env does on Kubernetes.

`python -m tests.support.multinode deploy ...` is the driver that deploys the AvatarServe app on such a cluster from
a separate process (a pytest process may already be connected to another Ray cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from avatarserve.serve.ops.launcher import _kill_group, free_port, ray_env, start_ray_node

__all__ = ["LocalRayNodes", "NodeSpec"]


@dataclass(frozen=True)
class NodeSpec:
    ip: str
    num_cpus: int
    resources: Mapping[str, float] = field(default_factory=dict)


class LocalRayNodes:
    """Head on `nodes[0].ip`, workers on the others; `env` is added to every node's environment."""

    def __init__(self, nodes: List[NodeSpec], temp_dir: Path, env: Optional[Mapping[str, str]] = None,
                 start_timeout_s: float = 600.0) -> None:
        self.nodes = nodes
        self.temp_dir = temp_dir
        self.env = {**ray_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **dict(env or {})}
        self.start_timeout_s = start_timeout_s  # each `ray start` must be up within this (a busy machine is slow)
        self.port = free_port()
        self.pgids: List[int] = []
        # Ray's socket paths must fit AF_UNIX's 107 bytes: a short directory of its own, not pytest's tmp_path.
        self.ray_dir = Path(tempfile.mkdtemp(prefix="avs-mn-", dir="/tmp"))

    @property
    def address(self) -> str:
        return f"{self.nodes[0].ip}:{self.port}"

    def _start(self, node: NodeSpec, head: bool) -> int:
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", node.ip,
               "--num-cpus", str(node.num_cpus), "--num-gpus", "0", "--disable-usage-stats",
               "--resources", json.dumps(dict(node.resources))]
        if head:
            cmd += ["--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--temp-dir", str(self.ray_dir)]
        else:
            cmd += ["--address", self.address]
        pid = start_ray_node(cmd, self.temp_dir / f"node-{node.ip}.log", self.env, self.start_timeout_s,
                             what=f"the Ray {'head' if head else 'worker node'} on {node.ip}",
                             listen=(node.ip, self.port) if head else None)
        self.pgids.append(pid)
        return pid

    def start(self) -> "LocalRayNodes":
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start(self.nodes[0], head=True)
            for node in self.nodes[1:]:
                self._start(node, head=False)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for pgid in reversed(self.pgids):
            _kill_group(pgid)
        self.pgids.clear()
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def logs(self, limit: int = 4000) -> str:
        out = []
        for log in sorted(self.temp_dir.glob("node-*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-limit:]}")
        return "\n".join(out)


# ------------------------------------------------------------------------------------------------- the driver


def _wait_nodes(expected: int, timeout_s: float = 600.0) -> None:
    import ray

    deadline = time.monotonic() + timeout_s  # every node's `ray start` has returned: they are registering
    while time.monotonic() < deadline:
        if len([n for n in ray.nodes() if n["Alive"]]) >= expected:
            return
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {expected} Ray nodes alive after {timeout_s:.0f} s: {ray.nodes()}")


def deploy_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Deploy the AvatarServe app on a running multi-node Ray cluster.")
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True, help="wait until this many nodes are alive")
    parser.add_argument("--grpc-port", type=int, help="with an app config: the Serve gRPC port")
    parser.add_argument("--http-port", type=int, help="with an app config: the Serve HTTP port")
    parser.add_argument("--app", required=True, help="the app config as JSON, or @file with a Serve config (YAML)")
    args = parser.parse_args(argv)
    os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_") and k not in os.environ})
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    import ray

    from avatarserve.serve.builder import deploy, grpc_options
    from avatarserve.serve.ops.progress import wait_running
    from avatarserve.serve.ray_compat import deploy_apps, start_serve

    ray.init(address=args.address, log_to_driver=False, namespace="avatarserve")
    try:
        _wait_nodes(args.nodes)
        if args.app.startswith("@"):  # a whole Serve config (the Helm chart's serveConfigV2): its proxies, its app
            import yaml
            from ray.serve.schema import ServeDeploySchema

            from avatarserve.serve.config import AppConfig

            config = yaml.safe_load(Path(args.app[1:]).read_text())
            start_serve(proxy_location=config["proxy_location"], http_options=config["http_options"],
                        grpc_options=config["grpc_options"])
            deploy_apps(ServeDeploySchema.model_validate(config))
            app = AppConfig.parse(config["applications"][0]["args"])
            wait_running([a["name"] for a in config["applications"]], app.require_redis(), app.registry_prefix)
            return 0
        # One proxy, on the head: every node of this cluster shares one machine, so per-node proxies would all
        # want the same port (on Kubernetes each pod has its own).
        start_serve(proxy_location="HeadOnly", grpc_options=grpc_options(args.grpc_port),
                    http_options={"host": args.address.rsplit(":", 1)[0], "port": args.http_port})
        deploy(json.loads(args.app))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["deploy"]:
        sys.exit("usage: python -m tests.support.multinode deploy --address ... (see --help)")
    sys.exit(deploy_main(sys.argv[2:]))
