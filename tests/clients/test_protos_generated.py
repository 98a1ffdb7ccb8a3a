"""The committed generated code is exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_gen():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_public_api_modules_import_as_packages() -> None:
    from avatarserve_client.v1 import avatar_service_pb2 as pb
    from avatarserve_client.v1 import avatar_service_pb2_grpc as pb_grpc

    assert pb.DESCRIPTOR.package == "avatarserve.v1"
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["AvatarService"].methods}
    assert methods == {"CreateSession", "StreamSession", "GetSession", "CloseSession"}
    stream = pb.DESCRIPTOR.services_by_name["AvatarService"].methods_by_name["StreamSession"]
    assert stream.client_streaming and stream.server_streaming
    assert hasattr(pb_grpc, "add_AvatarServiceServicer_to_server")
    assert (REPO / "services" / "avatarserve" / "v1" / "avatar_service_pb2.pyi").is_file()


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    protos, out = tmp_path / "protos", tmp_path / "services"
    shutil.copytree(REPO / "protos", protos)
    (out / "avatarserve").mkdir(parents=True)
    (out / "avatarserve" / "__init__.py").write_text("KEEP = 1\n")
    return protos, out


def test_generate_creates_packages_without_touching_existing_init(tree: tuple[Path, Path]) -> None:
    gen = _load_gen()
    protos, out = tree
    assert gen.main(["--proto-root", str(protos), "--out", str(out)]) == 0
    assert (out / "avatarserve" / "v1" / "avatar_service_pb2.py").is_file()
    assert (out / "avatarserve" / "v1" / "avatar_service_pb2_grpc.py").is_file()
    assert (out / "avatarserve" / "v1" / "__init__.py").read_text() == ""
    assert (out / "avatarserve" / "__init__.py").read_text() == "KEEP = 1\n"
    assert gen.main(["--check", "--proto-root", str(protos), "--out", str(out)]) == 0


def test_check_reports_edited_missing_and_stale_files(tree: tuple[Path, Path], capsys) -> None:
    gen = _load_gen()
    protos, out = tree
    assert gen.main(["--proto-root", str(protos), "--out", str(out)]) == 0
    pb2 = out / "avatarserve" / "v1" / "avatar_service_pb2.py"
    pb2.write_text(pb2.read_text() + "# hand edit\n")
    (out / "avatarserve" / "v1" / "avatar_service_pb2.pyi").unlink()
    (out / "avatarserve" / "v1" / "old_pb2.py").write_text("")
    capsys.readouterr()
    assert gen.main(["--check", "--proto-root", str(protos), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"differs: {pb2}" in err
    assert "missing: " in err and "avatar_service_pb2.pyi" in err
    assert "stale" in err and "old_pb2.py" in err


def test_proto_change_is_detected(tree: tuple[Path, Path], capsys) -> None:
    gen = _load_gen()
    protos, out = tree
    assert gen.main(["--proto-root", str(protos), "--out", str(out)]) == 0
    proto = protos / "avatarserve" / "v1" / "avatar_service.proto"
    proto.write_text(proto.read_text().replace("string prompt = 2;", "string prompt = 2;\n  string extra = 9;", 1))
    assert gen.main(["--check", "--proto-root", str(protos), "--out", str(out)]) == 1
    assert "differs" in capsys.readouterr().err


def test_protoc_error_is_reported(tmp_path: Path, capsys) -> None:
    gen = _load_gen()
    (tmp_path / "p" / "x").mkdir(parents=True)
    (tmp_path / "p" / "x" / "bad.proto").write_text('syntax = "proto3"; message {')
    assert gen.main(["--proto-root", str(tmp_path / "p"), "--out", str(tmp_path / "o")]) == 2
    assert "protoc exited" in capsys.readouterr().err
