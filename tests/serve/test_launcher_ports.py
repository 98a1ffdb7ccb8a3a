"""The launcher's ports for its servers (Redis, Ray, Serve's proxies, metrics, the TLS front) come from outside the
ranges other processes get ports from without asking: a port taken from the kernel's ephemeral range was bound by one
of Ray's own processes while the cluster started, and Serve's gRPC proxy then failed with "Address already in use"
(seen once in a fresh-clone run of tests/e2e/test_local_tls.py)."""

from __future__ import annotations

import socket

from avatarserve.serve.ops import launcher
from avatarserve.serve.ops.launcher import free_port


def test_ports_are_bindable_distinct_and_outside_ray_and_ephemeral_ranges() -> None:
    ephemeral = launcher._ephemeral_ports()
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports)  # never the same port twice in one process
    for port in ports:
        assert port not in ephemeral and port not in launcher._RAY_WORKER_PORTS
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out


def test_a_port_in_use_is_skipped(monkeypatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        busy.listen()
        monkeypatch.setattr(launcher, "_RAY_WORKER_PORTS", range(taken - 1, taken))
        monkeypatch.setattr(launcher, "_ephemeral_ports", lambda: range(taken + 1, taken + 2))
        monkeypatch.setattr(launcher, "_handed_out", set())
        # the gap is the one port in use: the kernel chooses instead, and never the busy one
        assert free_port() != taken


def test_without_a_gap_the_kernel_chooses(monkeypatch) -> None:
    ephemeral = launcher._ephemeral_ports()
    monkeypatch.setattr(launcher, "_ephemeral_ports", lambda: range(15000, 61000))  # starts inside Ray's worker ports
    port = free_port()
    assert port in ephemeral  # the kernel's choice
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_a_port_taken_on_the_wildcard_address_is_skipped(monkeypatch) -> None:
    """Serve's proxy binds 0.0.0.0 / [::]: a port something holds there is not free, though 127.0.0.1 alone would
    bind on some systems."""
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        taken = busy.getsockname()[1]
        busy.listen()
        assert not launcher._bindable("127.0.0.1", taken)
