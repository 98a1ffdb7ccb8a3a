"""`avatarserve up` with a replica that cannot load its model: it names the replica, the exception and the log file
to read, exits non-zero, and stops everything it started."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_up_names_the_failing_replica_and_stops_what_it_started(tmp_path):
    cfg = yaml.safe_load((REPO / "deploy" / "local.yaml").read_text())
    cfg["app"]["handlers"] = {"vae": "tests.support.slow_handlers:broken_vae_decoder"}
    cfg["app"]["ops"] = {"enabled": False}
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(cfg))
    state_dir = tmp_path / "state"
    env = dict(os.environ, AVATARSERVE_STATE_DIR=str(state_dir),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("REDIS_URL", None)
    pids_seen: list[int] = []
    proc = subprocess.Popen([sys.executable, "-m", "avatarserve.cli", "up", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    state_file = state_dir / "local-cluster.json"
    stderr_lines = []
    for line in proc.stderr:  # progress lines while it runs; the state file exists by the first of them
        stderr_lines.append(line)
        if not pids_seen and state_file.exists():
            state = json.loads(state_file.read_text())
            pids_seen = [p for p in (state.get("redis_pid"), state.get("ray_pgid")) if p]
    proc.wait()
    stderr = "".join(stderr_lines)
    print("FAILED_UP_STDERR_TAIL", stderr[-3000:])
    assert proc.returncode == 2, stderr[-3000:]
    error = stderr[stderr.index("avatarserve up: error:"):]
    assert re.search(r"replica VaeDecoder#\w+ failed: RuntimeError: weights file vae\.safetensors is truncated", error)
    log_files = re.findall(r"log: (\S+)", error)
    assert log_files and all("VaeDecoder" in f for f in log_files)
    assert not state_file.exists()  # `down` ran
    assert pids_seen and not any(_alive(p) for p in pids_seen)
