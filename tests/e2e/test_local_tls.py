"""`avatarserve up` with `app.tls`: the launcher runs the TLS front before Serve's plaintext gRPC proxy, prints the
front's address, `avatarserve stream --ca-cert` streams through it with the launcher's API key (read from the state
folder), a plaintext client fails the handshake, and `down` stops the front with everything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _run(args, env, timeout=900):
    return subprocess.run([sys.executable, "-m", "avatarserve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _self_signed(d: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))


def test_up_with_tls_stream_down(tmp_path):
    from avatarserve.toy.demo import write_demo_inputs

    _self_signed(tmp_path)
    cfg = yaml.safe_load((REPO / "deploy" / "local.yaml").read_text())
    cfg["app"]["tls"] = {"cert_file": str(tmp_path / "cert.pem"), "key_file": str(tmp_path / "key.pem"),
                         "host": "127.0.0.1"}
    cfg["app"]["ops"] = {"enabled": False}
    config = tmp_path / "tls.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, AVATARSERVE_STATE_DIR=str(tmp_path / "state"))
    env.pop("REDIS_URL", None)
    env.pop("AVATARSERVE_API_KEY", None)
    demo = write_demo_inputs(str(tmp_path), seconds=1.0)
    up = _run(["up", "--config", str(config)], env)
    state_file = tmp_path / "state" / "local-cluster.json"
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        info = json.loads(up.stdout.strip().splitlines()[-1])
        assert info["tls"] is True and info["grpc_address"] != info["serve_grpc_address"]
        key = Path(info["api_key_file"]).read_text().strip()
        assert f"created API key {key}" in up.stderr and key not in up.stdout  # shown once, on stderr
        state = json.loads(state_file.read_text())
        assert _alive(state["tls_front_pid"])
        common = ["--image", demo["image"], "--audio", demo["audio"], "--seed", "0"]
        st = _run(["stream", "--server", info["grpc_address"], "--ca-cert", str(tmp_path / "cert.pem"),
                   "--out", str(tmp_path / "tls.mp4"), *common], env)
        assert st.returncode == 0, st.stderr[-3000:]
        assert json.loads(st.stdout.strip().splitlines()[-1])["blocks"] == 3
        plain = _run(["stream", "--server", info["grpc_address"], "--timeout", "10",
                      "--out", str(tmp_path / "plain.mp4"), *common], env)
        assert plain.returncode != 0 and "UNAVAILABLE" in plain.stderr
    finally:
        down = _run(["down"], env, timeout=180)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "tls-front" in json.loads(down.stdout)["processes"]
    assert not _alive(state["tls_front_pid"])
