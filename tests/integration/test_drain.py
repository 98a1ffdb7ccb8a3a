"""Draining the cluster (what `avatarserve down` does before it stops Serve): an open stream delivers every block of the
audio its client sent, then DRAINED and END_OF_STREAM `server_draining`, and ends OK; meanwhile CreateSession and a
new stream get UNAVAILABLE with `retry-after-ms`; once the drain is lifted the same session streams again, its block
index going on from where the drained stream stopped."""

from __future__ import annotations

import threading

import grpc
import pytest
from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as rpc

from .conftest import APP, png, speech

pytestmark = pytest.mark.integration

BLOCKS = 3
SAMPLES_PER_BLOCK = 7680  # tiny config


def _audio_messages(pcm):
    """One chunk per block; seq and pts count from 0 on every stream (they are the stream's own)."""
    for i in range(BLOCKS):
        chunk = pcm[i * SAMPLES_PER_BLOCK:(i + 1) * SAMPLES_PER_BLOCK]
        yield pb.ClientMessage(audio=pb.AudioChunk(seq=i, pts_ms=i * 480, pcm=chunk.astype("<i2").tobytes()))


def test_drain_ends_open_streams_with_server_draining_and_refuses_new_work(cluster, redis_server):
    from avatarserve.serve.ops.launcher import drain_streams, undrain

    md = [("application", APP)]
    pcm = speech(BLOCKS, seed=4)
    with grpc.insecure_channel(cluster) as ch:
        stub = rpc.AvatarServiceStub(ch)
        resp = stub.CreateSession(pb.CreateSessionRequest(
            reference_image=png(11), options=pb.SessionOptions(idle=pb.IdleOptions(
                mode=pb.IDLE_MODE_WAIT_FOR_AUDIO))), metadata=md, timeout=600)
        sid, token = resp.session_id, resp.session_token
        smd = md + [("session_id", sid)]
        hello = pb.ClientMessage(hello=pb.Hello(session_id=sid, session_token=token))
        done = threading.Event()

        def requests():
            yield hello
            yield from _audio_messages(pcm)
            done.wait(900)  # the client keeps its side open: only the drain ends this stream

        drained = {}
        drainer = None
        out = []
        try:
            call = stub.StreamSession(requests(), metadata=smd, timeout=900)
            for msg in call:
                out.append(msg)
                if drainer is None and msg.WhichOneof("kind") == "video":
                    drainer = threading.Thread(target=lambda: drained.update(
                        drain_streams(redis_server.url, "itest:", wait_s=600)), daemon=True)
                    drainer.start()
            assert call.code() == grpc.StatusCode.OK, (call.code(), call.details())
            drainer.join(600)
            assert drained.get("open_streams_left") == 0, drained

            videos = [m.video for m in out if m.WhichOneof("kind") == "video"]
            statuses = [m.status for m in out if m.WhichOneof("kind") == "status"]
            assert [v.block_index for v in videos] == list(range(BLOCKS))  # everything the client sent
            assert statuses[-1].kind == pb.StatusEvent.KIND_END_OF_STREAM
            assert statuses[-1].code == "server_draining", statuses[-1]
            assert pb.StatusEvent.KIND_DRAINED in [s.kind for s in statuses]

            # While draining: no new session, no new stream, each with a retry hint.
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateSession(pb.CreateSessionRequest(reference_image=png(12)), metadata=md, timeout=600)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "draining" in refused.value.details()
            assert int(dict(refused.value.trailing_metadata() or ()).get("retry-after-ms", 0)) > 0
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.StreamSession(iter([hello]), metadata=smd, timeout=600))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            info = stub.GetSession(pb.GetSessionRequest(session_id=sid, session_token=token), metadata=smd,
                                   timeout=60)
            assert info.state == pb.SESSION_STATE_IDLE and not info.stream_open, info
        finally:
            done.set()
            undrain(redis_server.url, "itest:")

        # Lifted: the same session streams on, its block index continuing.
        def again():
            yield hello
            yield from _audio_messages(speech(BLOCKS, seed=5))
            yield pb.ClientMessage(control=pb.Control(kind=pb.Control.KIND_END_OF_INPUT))

        out = list(stub.StreamSession(again(), metadata=smd, timeout=900))
        assert [m.video.block_index for m in out if m.WhichOneof("kind") == "video"] == \
            list(range(BLOCKS, 2 * BLOCKS))
        assert out[-1].status.code == "end_of_input", out[-1]
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid, session_token=token), metadata=smd, timeout=60)
