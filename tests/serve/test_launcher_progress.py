"""`avatarserve up`'s progress display: what it shows for each deployment and replica, live or as plain lines."""

from __future__ import annotations

import io
import time

from avatarserve.serve.builder import DeploymentProgress
from avatarserve.serve.ops.launcher import ProgressDisplay
from avatarserve.serve.control.startup import StartupRecord


def _snapshot(audio_phase: str, audio_running: int) -> list:
    now_ms = int(time.time() * 1000)
    audio = StartupRecord("AudioEncoder", "r1", audio_phase, detail="liveavatar-14b from /ckpt on cuda",
                          started_ms=now_ms - 5000, phase_ms=now_ms - 3000,
                          error="RuntimeError: boom" if audio_phase == "failed" else "",
                          log_file="/tmp/ray/logs/serve/replica_avatarserve_AudioEncoder_r1.log")
    return [DeploymentProgress("AudioEncoder", "UPDATING", audio_running,
                               {"RUNNING": audio_running} if audio_running else {"STARTING": 1}, "", (audio,)),
            DeploymentProgress("VaeDecoder", "UPDATING", 0, {"STARTING": 1}, "", ())]


def test_plain_lines_change_only_when_something_happens() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, live=False)
    display.update(_snapshot("loading", 0))
    display.update(_snapshot("loading", 0))  # nothing new: no new lines
    display.update(_snapshot("ready", 1))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "AudioEncoder: 0/1 ready (1 starting) | #r1: loading weights liveavatar-14b from /ckpt on cuda [3s]" in lines[0]
    assert "VaeDecoder: 0/1 ready (1 starting) | starting the replica process" in lines[1]
    assert lines[2].endswith("AudioEncoder: 1/1 ready")


def test_live_display_redraws_in_place_and_names_failures() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, live=True)
    display.update(_snapshot("loading", 0))
    display.update(_snapshot("failed", 0))
    text = out.getvalue()
    first, second = text.split("\x1b[5F\x1b[J")  # the second frame replaces the 5 lines of the first
    assert first.startswith("deploying [up ") and "loading weights" in first
    assert "#r1: failed: RuntimeError: boom" in second
    assert "(log: /tmp/ray/logs/serve/replica_avatarserve_AudioEncoder_r1.log)" in second
