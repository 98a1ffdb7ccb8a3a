"""Serve stopping a gateway replica ends its open streams like a drain, not a cut.

Serve stops a replica (scale-down, a redeploy that replaces it, serve.delete) by waiting until no request is ongoing,
then calling `__del__`, and kills it when `graceful_shutdown_timeout_s` runs out. A gateway's stream is a request that
lasts as long as its session, so without the gateway noticing the stop itself its clients were cut when the budget ran
out (issue 14: "a gateway replica stopped by Serve itself still cuts its streams without `server_draining`").

Here Serve stops the gateway of a private app (serve.delete) while a stream is open with its client's side still open:
the client gets every block of the audio it sent, DRAINED, END_OF_STREAM `server_draining` and status OK, long before
the shutdown budget (`timeouts.session_drain_s` + 10 s), and the deletion completes.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as rpc

from .conftest import png, speech

pytestmark = pytest.mark.integration

APP = "avatarstop"
BLOCKS = 3
SAMPLES_PER_BLOCK = 7680  # tiny config
SESSION_DRAIN_S = 60  # Serve's budget for the gateway is this + 10 s: a cut would come only then
STREAM_TIMEOUT_S = 900  # a hang guard: the client's deadline


@pytest.fixture(scope="module")
def stop_app(serve_instance, redis_server):
    from ray import serve

    from avatarserve.serve.builder import deploy

    cfg = {"name": APP, "route_prefix": "/avatarstop", "redis_url": redis_server.url, "namespace": "gwstop:",
           "registry_namespace": "gwstop:", "auth": {"mode": "disabled"},
           "model": {"config": "tiny", "seed": 0, "stream_overrides": {"num_steps": 1}},
           "scheduling": {"admit_by": "configured"}, "autoscaling": {"enabled": False}, "ops": {"enabled": False},
           "timeouts": {"session_drain_s": SESSION_DRAIN_S, "stop_poll_s": 0.5}}
    deploy(cfg)
    yield serve_instance.grpc_address
    if APP in serve.status().applications:  # the test deletes it; this is for a test that failed before
        serve.delete(APP)


def _audio_messages(pcm):
    for i in range(BLOCKS):
        chunk = pcm[i * SAMPLES_PER_BLOCK:(i + 1) * SAMPLES_PER_BLOCK]
        yield pb.ClientMessage(audio=pb.AudioChunk(seq=i, pts_ms=i * 480, pcm=chunk.astype("<i2").tobytes()))


def test_serve_stopping_the_gateway_drains_its_open_stream(stop_app):
    from ray import serve

    md = [("application", APP)]
    with grpc.insecure_channel(stop_app) as ch:
        stub = rpc.AvatarServiceStub(ch)
        resp = stub.CreateSession(pb.CreateSessionRequest(
            reference_image=png(21), options=pb.SessionOptions(idle=pb.IdleOptions(
                mode=pb.IDLE_MODE_WAIT_FOR_AUDIO))), metadata=md, timeout=600)
        smd = md + [("session_id", resp.session_id)]
        hello = pb.ClientMessage(hello=pb.Hello(session_id=resp.session_id, session_token=resp.session_token))
        client_done = threading.Event()

        def requests():
            yield hello
            yield from _audio_messages(speech(BLOCKS, seed=6))
            client_done.wait(STREAM_TIMEOUT_S)  # the client keeps its side open: only the server ends this stream

        deleted = threading.Event()
        deleting_since = []

        def delete() -> None:
            deleting_since.append(time.monotonic())
            serve.delete(APP)  # blocks until every replica of the app is gone
            deleted.set()

        deleter = None
        out = []
        try:
            call = stub.StreamSession(requests(), metadata=smd, timeout=STREAM_TIMEOUT_S)
            for msg in call:
                out.append(msg)
                if deleter is None and msg.WhichOneof("kind") == "video":
                    deleter = threading.Thread(target=delete, daemon=True)
                    deleter.start()
            ended_after_s = time.monotonic() - deleting_since[0]
            code, details = call.code(), call.details()
        finally:
            client_done.set()
    assert deleter is not None, out
    print(f"stream ended {ended_after_s:.1f} s after serve.delete began (Serve's budget: {SESSION_DRAIN_S + 10} s)")
    assert code == grpc.StatusCode.OK, (code, details)
    videos = [m.video for m in out if m.WhichOneof("kind") == "video"]
    statuses = [m.status for m in out if m.WhichOneof("kind") == "status"]
    assert [v.block_index for v in videos] == list(range(BLOCKS))  # everything the client sent
    assert pb.StatusEvent.KIND_DRAINED in [s.kind for s in statuses], statuses
    assert statuses[-1].kind == pb.StatusEvent.KIND_END_OF_STREAM and statuses[-1].code == "server_draining", \
        statuses[-1]
    deleter.join(STREAM_TIMEOUT_S)
    assert deleted.is_set(), "serve.delete did not complete"
