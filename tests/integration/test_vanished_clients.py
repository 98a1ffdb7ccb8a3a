"""Clients that vanish (kill -9, no CloseSession) give back everything they held.

As many client processes as the shared app admits (8: one replica of each stage at capacity 8, its maximum) each
create a session with a 3 s idle timeout; half of them open a stream and are killed while it runs (after their first
video block), the others are killed right after CreateSession. Then, without any
client call: every session is closed by the idle sweep (its tombstone says CLOSED), no other key of those sessions is
left in Redis, no stage replica holds or reserves a slot for them (registry load back to its baseline), and no
replica keeps their state; then the app admits its full capacity again (8 new sessions at once), and a new session
streams normally. The time from the kills to the last slot released is printed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import redis

from .conftest import APP

pytestmark = pytest.mark.integration

CLIENTS = 8  # the shared app's maximum (admission never exceeds max replicas x capacity)
IDLE_TIMEOUT_S = 3

_CLIENT = textwrap.dedent('''
    import sys, time
    import grpc, numpy as np
    from avatarserve_client.v1 import avatar_service_pb2 as pb, avatar_service_pb2_grpc as rpc
    from tests.integration.conftest import png
    address, app, stream, IDLE = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    md = [("application", app)]
    with grpc.insecure_channel(address) as ch:
        stub = rpc.AvatarServiceStub(ch)
        resp = stub.CreateSession(pb.CreateSessionRequest(
            reference_image=png(int(time.time() * 1000) % 97),
            options=pb.SessionOptions(idle=pb.IdleOptions(idle_timeout_s=IDLE))), metadata=md, timeout=600)
        sid, token = resp.session_id, resp.session_token
        if not stream:
            print("READY", sid, flush=True)
            time.sleep(3600)
        def requests():
            yield pb.ClientMessage(hello=pb.Hello(session_id=sid, session_token=token))
            pcm = (np.sin(np.arange(1600) / 5.0) * 8000).astype("<i2").tobytes()
            seq = 0
            while True:
                yield pb.ClientMessage(audio=pb.AudioChunk(seq=seq, pts_ms=seq * 100, pcm=pcm))
                seq += 1
                time.sleep(0.1)
        for msg in stub.StreamSession(requests(), metadata=md + [("session_id", sid)]):
            if msg.WhichOneof("kind") == "video":
                print("READY", sid, flush=True)
                time.sleep(3600)
''')


def _load(redis_url: str) -> dict:
    """Slots in use per stage replica of the shared app (live + reserved), from the registry."""
    from avatarserve.serve.control.registry import ReplicaRegistry

    async def read():
        async with ReplicaRegistry.from_url(redis_url, namespace="itest:") as reg:
            out = {}
            for dep in ("AudioEncoder", "DenoiseStage0", "DenoiseStage1", "DenoiseStage2", "DenoiseStage3",
                        "VaeDecoder"):
                for info in await reg.replicas(dep):
                    out[f"{dep}/{info.replica_id}"] = (info.live_sessions, set(info.session_ids))
            return out

    return asyncio.run(read())


def _wait(cond, what: str, limit_s: float = 300.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} within {limit_s:g} s")


def test_vanished_clients_release_their_sessions_slots_and_keys(cluster, redis_server):
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    baseline = sum(n for n, _ in _load(redis_server.url).values())  # slots in use before (other tests' sessions)
    procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, cluster, APP, "1" if i < CLIENTS // 2 else "0",
                               str(IDLE_TIMEOUT_S)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_root())
             for i in range(CLIENTS)]
    sids = []
    try:
        for p in procs:  # each prints READY once its session exists (streamers: once video arrived)
            line = p.stdout.readline()
            if not line.startswith("READY"):
                p.kill()
                raise AssertionError(f"client failed: {line!r} {p.stderr.read()[-2000:]}")
            sids.append(line.split()[1])
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
    killed_at = time.monotonic()
    assert len(set(sids)) == CLIENTS

    def closed():
        return all(r.hget(f"itest:closed:{sid}", "state") == "CLOSED" for sid in sids)

    _wait(closed, "every vanished session closed by the idle sweep")

    def no_slots():
        load = _load(redis_server.url)
        held = {k: v for k, v in load.items() if v[1] & set(sids)}
        return not held and sum(n for n, _ in load.values()) <= baseline

    _wait(no_slots, "no stage replica holding a vanished session")
    released_s = time.monotonic() - killed_at
    left = [k for sid in sids for k in r.scan_iter(f"*{sid}*") if not k.startswith("itest:closed:")]
    assert not left, f"keys left behind: {left[:10]}"
    assert not any(sid in m for sid in sids for m in r.zrange("itest:idle", 0, -1))
    print(f"vanished clients: {CLIENTS} sessions ({CLIENTS // 2} mid-stream) closed and every slot released "
          f"{released_s:.1f} s after the kill (idle timeout {IDLE_TIMEOUT_S} s)")

    # Full capacity again, then a new session streams to the end.
    from avatarserve_client import AvatarClient
    from avatarserve_client.audio import chunk_pcm

    from .conftest import png, speech

    with AvatarClient(cluster, application=APP, timeout=300) as client:
        again = [client.create_session(png(i)) for i in range(CLIENTS)]
        for handle in again:
            client.close_session(handle)
        with client.session(png(1), "after", idle_mode="wait_for_audio") as s:
            blocks = list(s.stream(chunk_pcm(speech(3, seed=1), chunk_ms=100), decode=False, timeout=600))
    assert [b.block_index for b in blocks] == [0, 1, 2]


def test_cancelled_streams_leave_the_session_usable(cluster):
    """A client that cancels its stream at any point (right after STARTED, mid-audio, while the server rejects a bad
    chunk) leaves its session IDLE, with no error, and its stream lock comes free: the next Hello opens a stream.
    (Found by test_fuzz.py: Serve cancels the replica's fetch of the next client message with a TaskCancelledError,
    which once marked the session FAILED; a teardown cancelled half-way once kept the stream lock for good.)"""
    import random

    import grpc
    from avatarserve_client.v1 import avatar_service_pb2 as pb, avatar_service_pb2_grpc as rpc

    from .conftest import png

    rnd = random.Random(7)
    md = [("application", APP)]
    pcm = (np.sin(np.arange(1600) / 5.0) * 8000).astype("<i2").tobytes()
    shapes = ["after STARTED", "mid-audio", "bad chunk"] * 8
    rnd.shuffle(shapes)
    with grpc.insecure_channel(cluster) as ch:
        stub = rpc.AvatarServiceStub(ch)
        resp = stub.CreateSession(pb.CreateSessionRequest(reference_image=png(5)), metadata=md, timeout=600)
        sid, token = resp.session_id, resp.session_token
        smd = md + [("session_id", sid)]
        hello = pb.ClientMessage(hello=pb.Hello(session_id=sid, session_token=token))

        def info():
            return stub.GetSession(pb.GetSessionRequest(session_id=sid, session_token=token), metadata=smd,
                                   timeout=60)

        def requests(shape: str, release: threading.Event):
            yield hello
            if shape == "mid-audio":
                for k in range(rnd.randint(1, 6)):
                    yield pb.ClientMessage(audio=pb.AudioChunk(seq=k, pts_ms=k * 100, pcm=pcm))
            elif shape == "bad chunk":  # 2 s in one chunk: INVALID_ARGUMENT
                yield pb.ClientMessage(audio=pb.AudioChunk(seq=0, pts_ms=0, pcm=pcm * 20))
            release.wait(120)  # the client's side stays open: only the cancel ends the call

        for i, shape in enumerate(shapes):
            while True:  # the previous stream's lock is released asynchronously after the client's cancel returns
                release = threading.Event()
                call = stub.StreamSession(requests(shape, release), metadata=smd, timeout=120)
                try:
                    first = next(call)
                    assert first.status.kind == pb.StatusEvent.KIND_STARTED, first
                    if shape != "after STARTED" and rnd.random() < 0.5:
                        next(call)  # cancel a little later: after a video block or a status
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "already open" in exc.details():
                        _wait(lambda: not info().stream_open, f"stream {i}: the previous stream's lock released", 60)
                        continue
                    assert shape == "bad chunk" and exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                finally:
                    call.cancel()
                    release.set()
                break
            _wait(lambda: not info().stream_open, f"stream {i} ({shape}): stream_open false after the cancel", 60)
            got = info()
            assert got.state == pb.SESSION_STATE_IDLE and not got.error, (i, shape, got)

        # The session still streams to the end.
        def speech_requests():
            yield hello
            for k in range(10):
                yield pb.ClientMessage(audio=pb.AudioChunk(seq=k, pts_ms=k * 100, pcm=pcm))
            yield pb.ClientMessage(control=pb.Control(kind=pb.Control.KIND_END_OF_INPUT))

        out = list(stub.StreamSession(speech_requests(), metadata=smd, timeout=900))
        assert out[-1].status.kind == pb.StatusEvent.KIND_END_OF_STREAM, out[-1]
        assert any(m.WhichOneof("kind") == "video" for m in out)
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid, session_token=token), metadata=smd, timeout=60)


def _root() -> str:
    import pathlib

    return str(pathlib.Path(__file__).resolve().parents[2])
