"""A replica whose model takes 90 s to load deploys (no wall-clock limit around loading), `avatarserve up` shows it
loading, and sessions live as long as they stream: with a session TTL of a few seconds, a stream several times
longer never loses its session, and afterwards no Redis key of the project is left without a TTL.

One `avatarserve up` (its own redis-server and Ray head) serves both tests: starting it is the slow part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LOAD_DELAY_S = 90
SESSION_TTL_S = 3.0


@pytest.fixture(scope="module")
def slow_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slow-start")
    cfg = yaml.safe_load((REPO / "deploy" / "local.yaml").read_text())
    app = cfg["app"]
    app["handlers"] = {"audio": "tests.support.slow_handlers:slow_audio_encoder"}
    app["timeouts"] = {**app.get("timeouts", {}), "session_ttl_s": SESSION_TTL_S}
    app["ops"] = {"enabled": False}
    config = tmp / "slow.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, AVATARSERVE_STATE_DIR=str(tmp / "state"), AVATARSERVE_TEST_LOAD_DELAY_S=str(LOAD_DELAY_S),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("REDIS_URL", None)
    cli = [sys.executable, "-m", "avatarserve.cli"]
    started = time.monotonic()
    up = subprocess.run([*cli, "up", "--config", str(config)], env=env, capture_output=True, text=True, cwd=REPO)
    up_s = time.monotonic() - started
    try:
        assert up.returncode == 0, up.stderr[-4000:]
        info = json.loads(up.stdout.strip().splitlines()[-1])
        yield {"info": info, "stderr": up.stderr, "up_s": up_s}
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=600)


def test_slow_model_load_deploys_and_up_shows_it_loading(slow_cluster):
    progress = [line for line in slow_cluster["stderr"].splitlines() if line.startswith("[up]")]
    print("UP_PROGRESS", json.dumps({"up_s": round(slow_cluster["up_s"], 1), "lines": progress}))
    audio = [line for line in progress if "AudioEncoder:" in line]
    assert any("loading weights" in line for line in audio), progress
    assert any("AudioEncoder: 1/1 ready" in line for line in audio), progress
    assert slow_cluster["up_s"] > LOAD_DELAY_S  # the load really was in the way, and `up` waited for it


def test_stream_outlives_session_ttl_and_every_key_expires(slow_cluster):
    import redis

    from avatarserve_client import AvatarClient, VideoBlock
    from avatarserve_client.audio import chunk_pcm
    from avatarserve_client.errors import SessionNotFound
    from avatarserve.toy.demo import write_demo_inputs

    info = slow_cluster["info"]
    seconds = 4 * SESSION_TTL_S
    t = np.arange(int(seconds * 16000)) / 16000
    tone = (0.4 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
    demo = write_demo_inputs(str(Path(info["state_file"]).parent), seconds=1.0)
    image = Path(demo["image"]).read_bytes()
    r = redis.Redis.from_url(info["redis_url"])
    try:
        with AvatarClient(info["grpc_address"], application="avatarserve", timeout=300,
                          api_key=Path(info["api_key_file"]).read_text().strip()) as client:
            with client.session(image, seed=0) as s:
                blocks = [b for b in s.stream(chunk_pcm(tone, chunk_ms=240), realtime=True, timeout=600)
                          if isinstance(b, VideoBlock)]
                assert len(blocks) == int(np.ceil(seconds / 0.48))
                assert [b.pts_ms for b in blocks] == [480 * i for i in range(len(blocks))]
                wall = blocks[-1].received_at - blocks[0].received_at
                assert wall > 2 * SESSION_TTL_S  # the stream outlived the TTL several times over
                got = client.get_session(s.handle)  # the session survived its stream
                assert got.counters.blocks_delivered == len(blocks)
                keys = list(r.scan_iter(count=1000))
                assert keys
                # API keys are the operator's records (`avatarserve keys`), kept until revoked: the only keys
                # without a TTL. Everything a session or the serving layer writes expires on its own.
                operator = (b"avatarserve:apikey:", b"avatarserve:apikeys")
                no_ttl = [k for k in keys if r.pttl(k) == -1 and not k.startswith(operator)]
                assert not no_ttl, f"keys without a TTL: {no_ttl}"
                # Nothing streams now: the session expires on its own SESSION_TTL_S after its last stream.
                deadline = time.monotonic() + 120
                while True:
                    try:
                        client.get_session(s.handle)
                    except SessionNotFound:
                        break
                    assert time.monotonic() < deadline, "an idle session never expired"
                    time.sleep(0.5)
        print("TTL_REPORT", json.dumps({"stream_wall_s": round(wall, 2), "blocks": len(blocks),
                                        "session_ttl_s": SESSION_TTL_S, "keys_checked": len(keys)}))
    finally:
        r.close()
