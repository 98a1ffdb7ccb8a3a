"""How the launcher starts a Ray node (`start_ray_node`): it waits for `ray start` to report the runtime started, and
starts the node again when Ray gives up on its raylet after Ray's own fixed wait.

The retry cases run a small script in place of `ray start` that prints what `ray start` prints (the texts are checked
against Ray's own source below, so a Ray upgrade that changes them fails here), because the raylet timeout cannot be
caused on purpose. Every real cluster of the suite is started through the same function (tests/conftest.py)."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from avatarserve.serve.ops.launcher import (
    RAY_NODE_STARTUP_TIMED_OUT,
    RAY_RUNTIME_STARTED,
    RAY_SIGTERM_DRAIN_ENV,
    LauncherError,
    RayNodeStartTimedOut,
    free_port,
    ray_env,
    start_ray_head,
    start_ray_node,
    _kill_group,
)


def test_the_texts_the_launcher_waits_for_are_the_ones_ray_prints() -> None:
    import ray._private.node
    import ray.scripts.scripts

    assert RAY_NODE_STARTUP_TIMED_OUT in inspect.getsource(ray._private.node)
    assert RAY_RUNTIME_STARTED in inspect.getsource(ray.scripts.scripts)


def _fake_ray_start(tmp_path: Path, failures: int, last: str = "start") -> list[str]:
    """A `ray start --block` stand-in: its first `failures` runs print Ray's raylet timeout and exit 1, the next one
    does `last` ("start": prints the startup line and blocks; "crash": exits 2 with another error). Every run
    appends its pid to runs.txt."""
    script = tmp_path / "fake_ray_start.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        runs = {str(tmp_path / "runs.txt")!r}
        with open(runs, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        n = len(open(runs).read().split())
        if n <= {failures}:
            print("Exception: " + {RAY_NODE_STARTUP_TIMED_OUT!r} + ". This could happen because ...", flush=True)
            sys.exit(1)
        if {last!r} == "crash":
            print("ValueError: something else", flush=True)
            sys.exit(2)
        print({RAY_RUNTIME_STARTED!r}, flush=True)
        time.sleep(3600)
    """))
    return [sys.executable, str(script)]


def _runs(tmp_path: Path) -> list[int]:
    return [int(p) for p in (tmp_path / "runs.txt").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child that was not reaped yet counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_node_whose_raylet_timed_out_is_started_again(tmp_path, capsys) -> None:
    log = tmp_path / "ray-head.log"
    log.write_text(f"an earlier run of the same temp dir printed {RAY_RUNTIME_STARTED}\n")  # not this attempt's
    pid = start_ray_node(_fake_ray_start(tmp_path, failures=2), log, ray_env(), timeout_s=600, attempts=3)
    try:
        runs = _runs(tmp_path)
        assert len(runs) == 3 and runs[-1] == pid
        assert _alive(pid)
        assert not any(_alive(p) for p in runs[:-1])
        err = capsys.readouterr().err
        assert "attempt 1 of 3" in err and "attempt 2 of 3" in err and str(log) in err
    finally:
        _kill_group(pid)
    assert not _alive(pid)


def test_the_last_attempt_raises_a_typed_error_naming_the_setting(tmp_path) -> None:
    log = tmp_path / "ray-head.log"
    with pytest.raises(RayNodeStartTimedOut) as info:
        start_ray_node(_fake_ray_start(tmp_path, failures=5), log, ray_env(), timeout_s=600, attempts=2)
    assert len(_runs(tmp_path)) == 2
    assert "2 attempts, timeouts.ray_start_attempts" in str(info.value) and RAY_NODE_STARTUP_TIMED_OUT in str(info.value)
    assert not any(_alive(p) for p in _runs(tmp_path))


def test_any_other_exit_of_ray_start_fails_at_once_without_a_retry(tmp_path) -> None:
    log = tmp_path / "ray-head.log"
    with pytest.raises(LauncherError) as info:
        start_ray_node(_fake_ray_start(tmp_path, failures=0, last="crash"), log, ray_env(), timeout_s=600, attempts=3)
    assert not isinstance(info.value, RayNodeStartTimedOut)
    assert "exited with code 2" in str(info.value) and "ValueError: something else" in str(info.value)
    assert len(_runs(tmp_path)) == 1


def test_a_driver_in_a_process_that_imported_ray_too_early_is_refused_not_left_waiting() -> None:
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; imported before it is 0, a driver of the
    127.0.0.1 cluster would look for it on the host's routable address and retry there without end."""
    code = textwrap.dedent("""
        import os
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        import ray
        from avatarserve.serve.ops.launcher import LauncherError, connect_driver
        try:
            connect_driver("127.0.0.1:6379", "x")
        except LauncherError as exc:
            print("refused:", exc)
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    # The limit only bounds a regression (a driver that waits without end); importing Ray takes seconds.
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         timeout=900).stdout
    assert out.startswith("refused:") and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in out


def test_a_head_stops_on_sigterm_without_rays_drain_wait() -> None:
    """`down` and the tests stop a node by signalling its process group. Ray's SIGTERM handler would first ask the GCS
    (signalled too, already gone) to drain the node and wait 30 s for it; the launcher's nodes skip that wait, so
    SIGTERM stops them (exit 1 from Ray's handler) before `_kill_group` would resort to SIGKILL."""
    import ray._private.ray_constants

    assert RAY_SIGTERM_DRAIN_ENV in inspect.getsource(ray._private.ray_constants)
    assert ray_env()[RAY_SIGTERM_DRAIN_ENV] == "0"
    temp_dir = Path(f"/tmp/avs-sigterm-{os.getpid()}")  # AF_UNIX paths: not under pytest's long tmp_path
    pgid, _ = start_ray_head({"cluster": {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024}}, temp_dir,
                             free_port())
    try:
        os.killpg(pgid, signal.SIGTERM)
        _, status = os.waitpid(pgid, 0)
        log = (temp_dir / "ray-head.log").read_text()
        assert os.waitstatus_to_exitcode(status) == 1, log[-3000:]  # Ray's handler ended it (with or without a drain)
        assert "received SIGTERM" not in log and "Draining for up to" not in log, log[-3000:]
    finally:
        _kill_group(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)
