"""The client SDK is its own small distribution (clients/python, `avatarserve-client`).

The slow test installs it into a fresh virtual environment, as a user who only calls the service
would, and checks that none of the server's heavy stack (torch, Ray, diffusers, transformers)
comes with it. The fast tests check the packaging declarations and the missing-extra errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself requires tomli there
    tomllib = pytest.importorskip("tomli")

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "clients" / "python"
HEAVY = {"torch", "ray", "diffusers", "transformers"}


def _pyproject(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def test_client_pyproject_declares_a_small_distribution() -> None:
    project = _pyproject(CLIENT / "pyproject.toml")["project"]
    assert project["name"] == "avatarserve-client"
    assert _names(project["dependencies"]) == {"grpcio", "protobuf", "numpy", "pillow"}
    extras = project["optional-dependencies"]
    assert _names(extras["media"]) == {"av"}
    assert _names(extras["audio"]) == {"soundfile"}
    assert _names(extras["cli"]) == {"av", "soundfile"}
    everything = set().union(_names(project["dependencies"]), *(_names(r) for r in extras.values()))
    assert not everything & HEAVY
    assert project["scripts"]["avatarserve-stream"] == "avatarserve_client.cli:stream_main"


def test_server_depends_on_the_client_and_does_not_ship_it() -> None:
    root = _pyproject(REPO / "pyproject.toml")
    reqs = [Requirement(r) for r in root["project"]["dependencies"]]
    client = [r for r in reqs if canonicalize_name(r.name) == "avatarserve-client"]
    assert len(client) == 1 and {"audio", "media"} <= client[0].extras
    client_version = _pyproject(CLIENT / "pyproject.toml")["project"]["version"]
    assert client[0].specifier.contains(client_version)
    assert root["tool"]["setuptools"]["packages"]["find"]["where"] == ["services"]


def test_missing_media_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from avatarserve_client import AvatarServeError, MissingDependency, Mp4Writer, decode_h264

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(MissingDependency, match=r"avatarserve-client\[media\]") as info:
        Mp4Writer(tmp_path / "out.mp4")
    assert isinstance(info.value, ImportError) and isinstance(info.value, AvatarServeError)
    assert info.value.name == "av" and info.value.extra == "media"
    with pytest.raises(MissingDependency, match="H.264 decoding"):
        decode_h264(b"\x00\x00\x00\x01")


def test_missing_audio_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from avatarserve_client import MissingDependency, read_wav

    monkeypatch.setitem(sys.modules, "soundfile", None)
    with pytest.raises(MissingDependency, match=r"read_wav .*avatarserve-client\[audio\]"):
        read_wav(tmp_path / "speech.wav")


def test_stream_cli_without_its_extras_fails_before_connecting(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from avatarserve_client.cli import stream_main

    monkeypatch.setitem(sys.modules, "av", None)
    # An unroutable server: reaching the network at all would hang until the timeout.
    rc = stream_main(["--server", "203.0.113.1:9", "--image", "x.png", "--audio", "x.wav",
                      "--out", str(tmp_path / "o.mp4"), "--timeout", "0.5"])
    assert rc == 1
    assert "avatarserve-client[cli]" in capsys.readouterr().err


def _clean_env() -> dict[str, str]:
    """This process's environment without what would leak the checkout into the new venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_clean_venv_install_has_no_server_stack(tmp_path: Path) -> None:
    # pip builds in the source tree (build/, *.egg-info): build a copy, leave the checkout clean.
    src = tmp_path / "src"
    shutil.copytree(CLIENT, src, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", str(src)], cwd=tmp_path)

    listed = json.loads(_run([str(py), "-m", "pip", "list", "--format=json"], cwd=tmp_path).stdout)
    installed = {canonicalize_name(d["name"]) for d in listed}
    assert "avatarserve-client" in installed
    assert not installed & HEAVY, sorted(installed)
    assert not installed & {"av", "soundfile"}, "optional extras were installed by default"
    assert len(installed) < 15, sorted(installed)  # the SDK, its 4 dependencies and a few of theirs

    # -I: no PYTHONPATH, no user site, no current directory: only what the venv has.
    probe = ("import avatarserve_client, pathlib\n"
             "from avatarserve_client.v1 import avatar_service_pb2, avatar_service_pb2_grpc\n"
             "from avatarserve_client import AsyncAvatarClient, AvatarClient\n"
             "assert avatar_service_pb2.DESCRIPTOR.package == 'avatarserve.v1'\n"
             "assert hasattr(avatar_service_pb2_grpc, 'AvatarServiceStub')\n"
             "v1 = pathlib.Path(avatar_service_pb2.__file__).parent\n"
             "assert (v1 / 'avatar_service_pb2.pyi').is_file()\n"
             "import importlib.util\n"
             "assert importlib.util.find_spec('avatarserve') is None\n"
             "print(avatarserve_client.__file__)\n")
    out = _run([str(py), "-I", "-c", probe], cwd=tmp_path).stdout
    assert str(venv) in out  # imported from the venv, not from the checkout

    script = venv / "bin" / "avatarserve-stream"
    help_text = _run([str(script), "--help"], cwd=tmp_path).stdout
    assert "usage: avatarserve-stream" in help_text and "--server" in help_text
    assert "--server" in _run([str(py), "-I", "-m", "avatarserve_client", "stream", "--help"],
                              cwd=tmp_path).stdout
