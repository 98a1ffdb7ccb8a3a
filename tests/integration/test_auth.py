"""API keys, per-key quotas and TLS against a real app with `auth.mode: required`.

A second Serve application (`avatarserve-auth`, tiny model with one denoising step, its own Redis namespaces)
runs next to the shared `cluster` app on the test session's Ray cluster and Serve gRPC proxy. Keys are created in
its Redis namespace with the key store. Every status code is observed through the real proxy: UNAUTHENTICATED (no
key, bad key), PERMISSION_DENIED (revoked), RESOURCE_EXHAUSTED with `retry-after-ms` (concurrent sessions,
session-seconds), OK with both metadata forms. The TLS front (serve/api/tls_front.py) runs as the subprocess
`avatarserve up` starts, with a self-signed certificate made here.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest

from avatarserve_client.v1 import avatar_service_pb2 as pb
from avatarserve_client.v1 import avatar_service_pb2_grpc as pb_grpc

from .conftest import png

pytestmark = pytest.mark.integration

AUTH_APP = "avatarserve-auth"
NS = "authtest:"
HEALTH_WAIT_S = 300.0


def _run(coro):
    return asyncio.run(coro)


async def _store_call(url: str, fn):
    from avatarserve.serve.control.api_keys import ApiKeyStore

    store = ApiKeyStore.from_url(url, namespace=NS)
    try:
        return await fn(store)
    finally:
        await store.close()


def make_key(url: str, name: str, **limits) -> tuple[str, str]:
    """(key id, plain key) of a new key in the auth app's namespace."""
    from avatarserve.serve.control.api_keys import QuotaLimits

    rec, key = _run(_store_call(url, lambda s: s.create(name, QuotaLimits(**limits))))
    return rec.key_id, key


def _wait_serving(address: str, application: str, timeout_s: float, credentials=None) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        ch = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="avatarserve.v1.AvatarService"), timeout=5,
                metadata=(("application", application),), wait_for_ready=True)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = resp.status
        except grpc.RpcError as exc:
            last = exc
        finally:
            ch.close()
    raise AssertionError(f"{application} at {address} not SERVING after {timeout_s:g} s: {last}")


@pytest.fixture(scope="module")
def auth_app(serve_instance, redis_server):
    from ray import serve

    from avatarserve.serve.builder import build_app
    from avatarserve.serve.ops.progress import wait_running

    cfg = {"name": AUTH_APP, "route_prefix": f"/{AUTH_APP}", "redis_url": redis_server.url, "namespace": NS,
           "registry_namespace": NS, "model": {"config": "tiny", "seed": 0, "stream_overrides": {"num_steps": 1}},
           "auth": {"mode": "required", "usage_flush_s": 0.5}, "retry_after_ms": 1234,
           "ops": {"sample_interval_s": 1.0},
           # Slots by count: the quota tests hold two sessions at once, which a busy machine's measured capacity
           # may not admit (a refusal by capacity is not what they test).
           "scheduling": {"admit_by": "configured"}, "capacity": {"audio": 8, "denoise": 8, "vae": 8},
           "timeouts": {"session_drain_s": 30}}
    serve.run(build_app(cfg), name=AUTH_APP, route_prefix=f"/{AUTH_APP}", blocking=False)
    wait_running([AUTH_APP], redis_server.url, NS)
    _wait_serving(serve_instance.grpc_address, AUTH_APP, HEALTH_WAIT_S)
    yield serve_instance.grpc_address
    serve.delete(AUTH_APP)


def _md(*extra) -> list:
    return [("application", AUTH_APP), *extra]


def _create_raw(address: str, metadata, image: bytes = None):
    """CreateSession on a raw stub: (response or None, status code, details, trailing metadata dict)."""
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.AvatarServiceStub(ch)
        req = pb.CreateSessionRequest(reference_image=image or png(3), prompt="a face")
        try:
            resp, call = stub.CreateSession.with_call(req, metadata=metadata, timeout=120)
            return resp, grpc.StatusCode.OK, "", {}
        except grpc.RpcError as err:
            return None, err.code(), err.details(), dict(err.trailing_metadata() or ())


def _close_raw(address: str, resp) -> None:
    with grpc.insecure_channel(address) as ch:
        pb_grpc.AvatarServiceStub(ch).CloseSession(
            pb.CloseSessionRequest(session_id=resp.session_id, session_token=resp.session_token),
            metadata=_md(("session_id", resp.session_id)), timeout=60)


def _pcm(blocks: int = 2) -> np.ndarray:
    t = np.arange(blocks * 7680) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * 32767).astype(np.int16)


def test_status_codes(auth_app, redis_server):
    from avatarserve_client import AvatarClient, PermissionDenied, Unauthenticated

    key_id, key = make_key(redis_server.url, "codes")
    # no key
    _, code, details, _ = _create_raw(auth_app, _md())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in details
    # a bad key: malformed, unknown id, wrong secret of a known id
    for bad in ("hunter2", "avs_0123456789ab_" + "x" * 43, f"avs_{key_id}_" + "y" * 43):
        _, code, _, _ = _create_raw(auth_app, _md(("authorization", f"Bearer {bad}")))
        assert code == grpc.StatusCode.UNAUTHENTICATED, bad
    # OK with both metadata forms; the session RPCs then use the session token only
    for form in (("authorization", f"Bearer {key}"), ("x-api-key", key)):
        resp, code, details, _ = _create_raw(auth_app, _md(form))
        assert code == grpc.StatusCode.OK, details
        with grpc.insecure_channel(auth_app) as ch:
            info = pb_grpc.AvatarServiceStub(ch).GetSession(
                pb.GetSessionRequest(session_id=resp.session_id, session_token=resp.session_token),
                metadata=_md(("session_id", resp.session_id)), timeout=60)
        assert info.session_id == resp.session_id
        _close_raw(auth_app, resp)
    # the SDK: Unauthenticated without a key; api_key= works; the environment variable is the default
    with AvatarClient(auth_app, application=AUTH_APP, timeout=120, api_key="") as c:
        with pytest.raises(Unauthenticated) as err:
            c.create_session(png(3))
        assert isinstance(err.value, PermissionDenied) and "AVATARSERVE_API_KEY" in str(err.value)
    with AvatarClient(auth_app, application=AUTH_APP, timeout=120, api_key=key) as c:
        c.close_session(c.create_session(png(3)))
        with c.session(png(3)) as s:
            assert s.info().session_id == s.session_id
    # revoked: PERMISSION_DENIED
    _run(_store_call(redis_server.url, lambda s: s.revoke(key_id)))
    _, code, details, _ = _create_raw(auth_app, _md(("x-api-key", key)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and key_id in details and "revoked" in details
    with AvatarClient(auth_app, application=AUTH_APP, timeout=120, api_key=key) as c:
        with pytest.raises(PermissionDenied) as err:
            c.create_session(png(3))
        assert not isinstance(err.value, Unauthenticated)


def test_concurrent_session_quota(auth_app, redis_server):
    from avatarserve_client import AvatarClient, CapacityExhausted

    key_id, key = make_key(redis_server.url, "one-at-a-time", max_sessions=1)
    first, code, details, _ = _create_raw(auth_app, _md(("authorization", f"Bearer {key}")))
    assert code == grpc.StatusCode.OK, details
    _, code, details, trailing = _create_raw(auth_app, _md(("authorization", f"Bearer {key}")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and key_id in details
    assert trailing.get("retry-after-ms") == "1234"
    with AvatarClient(auth_app, application=AUTH_APP, timeout=120, api_key=key) as c:
        with pytest.raises(CapacityExhausted) as err:
            c.create_session(png(3))
        assert err.value.retry_after_s == pytest.approx(1.234)
    # closing gives the slot back at once
    _close_raw(auth_app, first)
    again, code, details, _ = _create_raw(auth_app, _md(("x-api-key", key)))
    assert code == grpc.StatusCode.OK, details
    _close_raw(auth_app, again)


def test_session_seconds_quota(auth_app, redis_server):
    from avatarserve_client import AvatarClient, CapacityExhausted
    from avatarserve_client.audio import chunk_pcm

    key_id, key = make_key(redis_server.url, "metered", session_seconds=0.01, period_s=3600)
    with AvatarClient(auth_app, application=AUTH_APP, timeout=120, api_key=key) as c:
        spare = c.create_session(png(4), idle_mode="wait_for_audio")
        with c.session(png(4), idle_mode="wait_for_audio") as s:
            blocks = list(s.stream(chunk_pcm(_pcm(2), chunk_ms=100), decode=False, timeout=300))
            assert len(blocks) == 2
        used = _run(_store_call(redis_server.url, lambda st: st.usage(key_id, 3600)))
        assert used > 0.01  # the stream's time was charged when it ended
        with pytest.raises(CapacityExhausted) as err:
            c.create_session(png(4))
        assert "session-seconds" in err.value.details and 0 < err.value.retry_after_s <= 3600
        # a session created before the quota ran out cannot open a stream either
        with pytest.raises(CapacityExhausted):
            list(c.attach(spare).stream(chunk_pcm(_pcm(1), chunk_ms=100), decode=False, timeout=300))
        c.close_session(spare)


def test_ops_page_and_metrics_never_show_keys_or_tokens(auth_app, redis_server, serve_instance, ray_cluster):
    from avatarserve_client import AvatarClient
    from avatarserve_client.audio import chunk_pcm

    from avatarserve.serve.control.api_keys import parse_key

    key_id, key = make_key(redis_server.url, "leak-check")
    with AvatarClient(auth_app, application=AUTH_APP, timeout=120, api_key=key) as c:
        with c.session(png(5), idle_mode="wait_for_audio") as s:
            token = s.handle.session_token
            list(s.stream(chunk_pcm(_pcm(1), chunk_ms=100), decode=False, timeout=300))
            pages = {}
            for path in ("/", "/api/series"):
                url = f"{serve_instance.http_address}/{AUTH_APP}/ops{path}"
                with urllib.request.urlopen(url, timeout=60) as r:
                    pages[url] = r.read().decode("utf-8", "replace")
            deadline = time.monotonic() + 120
            metrics = ""
            while time.monotonic() < deadline:  # until the gateway's creates of this app are exported
                with urllib.request.urlopen(f"http://127.0.0.1:{ray_cluster.metrics_export_port}/metrics",
                                            timeout=60) as r:
                    metrics = r.read().decode("utf-8", "replace")
                if f'application="{AUTH_APP}"' in metrics and "avatarserve_session_creates" in metrics:
                    break
                time.sleep(0.5)
            pages["/metrics"] = metrics
    assert f'application="{AUTH_APP}"' in metrics
    secret = parse_key(key)[1]  # the whole secret: it may contain "_" itself (the last "_"-part was once one letter)
    for where, text in pages.items():
        assert text, where
        for needle in (key, secret, token):
            assert needle not in text, f"{where} contains a secret"


# ----------------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory):
    """A self-signed CA and a server certificate for 127.0.0.1 / localhost, made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "avatarserve test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(pem_key(key))
    # another CA the server's certificate is not signed by
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")])
    other = (x509.CertificateBuilder().subject_name(other_name).issuer_name(other_name)
             .public_key(other_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(other_key, hashes.SHA256()))
    (d / "other-ca.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    return d


@pytest.fixture(scope="module")
def tls_front(auth_app, tls_certs):
    """`python -m avatarserve.serve.api.tls_front` before the Serve proxy, as `avatarserve up` runs it."""
    proc = subprocess.Popen([sys.executable, "-m", "avatarserve.serve.api.tls_front", "--upstream", auth_app,
                             "--cert", str(tls_certs / "cert.pem"), "--key", str(tls_certs / "key.pem"),
                             "--host", "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()  # "tls-front listening on HOST:PORT -> UPSTREAM" once it is bound
        assert "listening on" in line, proc.stderr.read() if proc.poll() is not None else line
        address = line.split("listening on ", 1)[1].split(" ->")[0]
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tls_front_streams_with_the_ca_and_refuses_plaintext(tls_front, tls_certs, redis_server, monkeypatch):
    from avatarserve_client import AvatarClient, CapacityExhausted, Unauthenticated, Unavailable
    from avatarserve_client.audio import chunk_pcm

    key_id, key = make_key(redis_server.url, "tls", max_sessions=1)
    ca = tls_certs / "ca.pem"
    _wait_serving(tls_front, AUTH_APP, 60, grpc.ssl_channel_credentials(ca.read_bytes()))
    monkeypatch.setenv("AVATARSERVE_API_KEY", key)  # the SDK's default
    with AvatarClient(tls_front, application=AUTH_APP, timeout=120, root_certificates=str(ca)) as c:
        with c.session(png(6), idle_mode="wait_for_audio") as s:
            blocks = list(s.stream(chunk_pcm(_pcm(2), chunk_ms=100), decode=False, timeout=300))
            assert [b.block_index for b in blocks] == [0, 1]
            assert s.info().session_id == s.session_id
            # status, details and trailing metadata come back through the front
            with pytest.raises(CapacityExhausted) as err:
                c.create_session(png(6))
            assert err.value.retry_after_s == pytest.approx(1.234) and key_id in err.value.details
        with pytest.raises(Unauthenticated):
            AvatarClient(tls_front, application=AUTH_APP, timeout=60, root_certificates=str(ca),
                         api_key="avs_0123456789ab_" + "z" * 43).create_session(png(6))
    # a plaintext client fails the handshake; so does a client that trusts another CA
    for kwargs in ({}, {"root_certificates": str(tls_certs / "other-ca.pem")}):
        with AvatarClient(tls_front, application=AUTH_APP, timeout=10, **kwargs) as c:
            with pytest.raises(Unavailable):
                c.create_session(png(6))
