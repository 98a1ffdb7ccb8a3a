"""The README's main job, end to end: `avatarserve up`, `avatarserve stream`, `avatarserve down`.

Runs the real launcher (redis-server + a Ray head in its own process group + the Serve app) on loopback, streams
a toy-world clip through the public gRPC API with the SDK CLI, and checks the mp4 (the default toy model through
the cluster makes the same talking face as `avatarserve generate` does in one process) and that `down` stops
exactly what `up` started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import av
import grpc
import numpy as np
import pytest
from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "avatarserve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _LiveStream:
    """A client mid-stream (raw gRPC): it sends a few blocks of audio and keeps its side open."""

    def __init__(self, address: str, key_file: str, image: str):
        self.first_video = threading.Event()
        self.error = None
        self.code = None
        self.last = None
        self.thread = threading.Thread(target=self._run, args=(address, key_file, image), daemon=True)
        self.thread.start()

    def _run(self, address: str, key_file: str, image: str) -> None:
        try:
            md = [("authorization", "Bearer " + open(key_file).read().strip())]
            with grpc.insecure_channel(address) as ch:
                stub = pb_grpc.AvatarServiceStub(ch)
                resp = stub.CreateSession(pb.CreateSessionRequest(reference_image=open(image, "rb").read()),
                                          metadata=md, timeout=600)
                hold = threading.Event()

                def requests():
                    yield pb.ClientMessage(hello=pb.Hello(session_id=resp.session_id,
                                                          session_token=resp.session_token))
                    pcm = (np.sin(np.arange(1600) / 5.0) * 8000).astype("<i2").tobytes()
                    for k in range(20):
                        yield pb.ClientMessage(audio=pb.AudioChunk(seq=k, pts_ms=k * 100, pcm=pcm))
                    hold.wait(600)

                call = stub.StreamSession(requests(), metadata=md + [("session_id", resp.session_id)], timeout=900)
                try:
                    for msg in call:
                        if msg.WhichOneof("kind") == "video":
                            self.first_video.set()
                        elif msg.WhichOneof("kind") == "status":
                            self.last = msg.status
                    self.code = call.code().name
                finally:
                    hold.set()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.first_video.set()


def test_up_stream_down(tmp_path):
    env = dict(os.environ, AVATARSERVE_STATE_DIR=str(tmp_path / "state"))
    env.pop("REDIS_URL", None)
    from avatarserve.toy.demo import write_demo_inputs

    demo = write_demo_inputs(str(tmp_path), seconds=3.0)
    up = _run(["up", "--config", "deploy/local.yaml"], env)
    state_file = tmp_path / "state" / "local-cluster.json"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        info = json.loads(up.stdout.strip().splitlines()[-1])
        assert info["grpc_address"].startswith("127.0.0.1:")
        state = json.loads(state_file.read_text())
        assert _alive(state["redis_pid"]) and _alive(state["ray_pgid"])
        # a second `up` refuses instead of starting a second cluster
        again = _run(["up"], env, timeout=60)
        assert again.returncode != 0 and "already" in again.stderr

        out = tmp_path / "demo.mp4"
        st = _run(["stream", "--server", info["grpc_address"], "--image", demo["image"], "--audio", demo["audio"],
                   "--out", str(out), "--seed", "0"], env)
        assert st.returncode == 0, st.stderr[-3000:]
        summary = json.loads(st.stdout.strip().splitlines()[-1])
        assert summary["blocks"] == 7 and summary["frames"] == 84  # 3 s of audio -> 7 blocks of 12 frames
        with av.open(str(out)) as c:
            v = c.streams.video[0]
            assert v.average_rate == 25
            streamed = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
            assert len(c.streams.audio) == 1
        assert streamed.shape == (84, 64, 64, 3)

        # `down` during a live stream: the stream ends with END_OF_STREAM server_draining, not a dead replica's error
        live = _LiveStream(info["grpc_address"], state["api_key_file"], demo["image"])
        live.first_video.wait(600)
        assert live.error is None, live.error
        down = _run(["down"], env, timeout=600)
        live.thread.join(600)
        assert live.error is None, live.error
        assert (live.code, live.last.kind, live.last.code) == (
            "OK", pb.StatusEvent.KIND_END_OF_STREAM, "server_draining"), (live.code, live.last)
        assert json.loads(down.stdout.strip().splitlines()[-1])["drain"]["open_streams_left"] == 0, down.stdout
    finally:
        if state_file.exists():
            down = _run(["down"], env, timeout=600)
    assert down.returncode == 0, down.stderr[-2000:]
    assert not state_file.exists()
    assert not _alive(state["redis_pid"])
    # every process of the Ray head's process group is gone
    assert subprocess.run(["pgrep", "-g", str(state["ray_pgid"])], capture_output=True).returncode == 1

    # The same inputs through the single-process pipeline: the same frames up to the lossy codecs on the way
    # (JPEG/H.264 over the wire, H.264 in both files), and a face that talks with the audio.
    local = tmp_path / "local.mp4"
    gen = _run(["generate", "--image", demo["image"], "--audio", demo["audio"], "--out", str(local), "--seed", "0"],
               env)
    assert gen.returncode == 0, gen.stderr[-3000:]
    with av.open(str(local)) as c:
        sequential = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert sequential.shape == streamed.shape
    diff = np.abs(streamed.astype(np.int16) - sequential.astype(np.int16))
    assert diff.mean() < 3.0, diff.mean()  # measured 2.2 (JPEG over the wire, then H.264 in both files)
    from PIL import Image

    from avatarserve import quality

    ref = np.asarray(Image.open(demo["image"]).convert("RGB"))
    res = quality.evaluate_file(str(out), ref)
    assert res["face_lost_frames"] == 0 and res["lipsync_corr"] > 0.5 and abs(res["best_offset_frames"]) <= 1, res
