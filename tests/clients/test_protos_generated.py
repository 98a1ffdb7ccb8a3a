"""The committed generated code is exactly what scripts/gen_protos.py makes from protos/."""

from __future__ import annotations

import importlib.util
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
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
    assert (REPO / "clients" / "python" / "avatarserve_client" / "v1" / "avatar_service_pb2.pyi").is_file()
    # The public API lives only in the client distribution; the server keeps the stage protocol.
    assert not (REPO / "services" / "avatarserve" / "v1").exists()
    assert (REPO / "services" / "avatarserve" / "stage" / "v1" / "stage_pb2.py").is_file()


def test_public_messages_pickle_under_the_client_module_name() -> None:
    """Ray pickles messages: their classes must be registered under an importable module."""
    from avatarserve_client.v1 import avatar_service_pb2 as pb

    assert pb.ClientMessage.__module__ == "avatarserve_client.v1.avatar_service_pb2"
    msg = pb.ClientMessage(hello=pb.Hello(session_id="s", session_token="t"))
    assert pickle.loads(pickle.dumps(msg)) == msg


@dataclass
class Tree:
    protos: Path
    server: Path  # server package root (services/)
    client: Path  # client package root (clients/python/)

    def args(self, *extra: str) -> list[str]:
        return [*extra, "--proto-root", str(self.protos), "--server-out", str(self.server),
                "--client-out", str(self.client)]

    @property
    def public(self) -> Path:
        return self.client / "avatarserve_client" / "v1"


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path / "protos", tmp_path / "services", tmp_path / "clients" / "python")
    shutil.copytree(REPO / "protos", t.protos)
    (t.server / "avatarserve").mkdir(parents=True)
    (t.server / "avatarserve" / "__init__.py").write_text("KEEP = 1\n")
    (t.client / "avatarserve_client").mkdir(parents=True)
    (t.client / "avatarserve_client" / "__init__.py").write_text("KEEP = 2\n")
    return t


def test_generate_routes_public_api_to_client_and_stage_to_server(tree: Tree) -> None:
    gen = _load_gen()
    assert gen.main(tree.args()) == 0
    for name in ("avatar_service_pb2.py", "avatar_service_pb2_grpc.py", "avatar_service_pb2.pyi"):
        assert (tree.public / name).is_file()
    assert not (tree.server / "avatarserve" / "v1").exists()
    assert not (tree.client / "avatarserve").exists()
    assert (tree.server / "avatarserve" / "stage" / "v1" / "stage_pb2.py").is_file()
    assert (tree.public / "__init__.py").read_text() == ""
    assert (tree.server / "avatarserve" / "stage" / "v1" / "__init__.py").read_text() == ""
    assert (tree.server / "avatarserve" / "__init__.py").read_text() == "KEEP = 1\n"
    assert (tree.client / "avatarserve_client" / "__init__.py").read_text() == "KEEP = 2\n"
    grpc_py = (tree.public / "avatar_service_pb2_grpc.py").read_text()
    assert "from avatarserve_client.v1 import avatar_service_pb2 as" in grpc_py
    assert "from avatarserve.v1" not in grpc_py
    assert "'/avatarserve.v1.AvatarService/StreamSession'" in grpc_py  # wire names unchanged
    pb2 = (tree.public / "avatar_service_pb2.py").read_text()
    assert "'avatarserve_client.v1.avatar_service_pb2'" in pb2
    assert ".avatarserve.v1.AudioEncoding" in pb2  # the descriptor keeps the proto package
    assert gen.main(tree.args("--check")) == 0


def test_import_of_a_public_proto_is_rewritten(tree: Tree) -> None:
    """A proto that imports a public one imports the client package's module."""
    gen = _load_gen()
    extra = tree.protos / "avatarserve" / "stage" / "v1" / "uses_public.proto"
    extra.write_text('syntax = "proto3";\npackage avatarserve.stage.v1;\n'
                     'import "avatarserve/v1/avatar_service.proto";\n'
                     "message Wrapped { avatarserve.v1.AudioChunk chunk = 1; }\n")
    assert gen.main(tree.args()) == 0
    stage = tree.server / "avatarserve" / "stage" / "v1"
    assert "from avatarserve_client.v1 import avatar_service_pb2 as" in (stage / "uses_public_pb2.py").read_text()
    assert "from avatarserve_client.v1 import avatar_service_pb2 as" in (stage / "uses_public_pb2.pyi").read_text()
    assert "'avatarserve.stage.v1.uses_public_pb2'" in (stage / "uses_public_pb2.py").read_text()


def test_check_reports_edited_missing_and_stale_files(tree: Tree, capsys) -> None:
    gen = _load_gen()
    assert gen.main(tree.args()) == 0
    pb2 = tree.public / "avatar_service_pb2.py"
    pb2.write_text(pb2.read_text() + "# hand edit\n")
    (tree.public / "avatar_service_pb2.pyi").unlink()
    (tree.public / "old_pb2.py").write_text("")
    (tree.server / "avatarserve" / "v1").mkdir()
    (tree.server / "avatarserve" / "v1" / "avatar_service_pb2.py").write_text("")  # the old location
    capsys.readouterr()
    assert gen.main(tree.args("--check")) == 1
    err = capsys.readouterr().err
    assert f"differs: {pb2}" in err
    assert "missing: " in err and "avatar_service_pb2.pyi" in err
    assert "stale" in err and "old_pb2.py" in err
    assert f"stale (no .proto produces it): {tree.server / 'avatarserve' / 'v1' / 'avatar_service_pb2.py'}" in err
    assert gen.main(tree.args()) == 0  # regenerating removes the stale files
    assert not (tree.public / "old_pb2.py").exists()
    assert gen.main(tree.args("--check")) == 0


def test_build_trees_are_not_stale(tree: Tree) -> None:
    """`pip install ./clients/python` leaves build/lib copies; they are not committed code."""
    gen = _load_gen()
    assert gen.main(tree.args()) == 0
    copy = tree.client / "build" / "lib" / "avatarserve_client" / "v1"
    copy.mkdir(parents=True)
    (copy / "avatar_service_pb2.py").write_text("")
    assert gen.main(tree.args("--check")) == 0


def test_proto_change_is_detected(tree: Tree, capsys) -> None:
    gen = _load_gen()
    assert gen.main(tree.args()) == 0
    proto = tree.protos / "avatarserve" / "v1" / "avatar_service.proto"
    proto.write_text(proto.read_text().replace("string prompt = 2;", "string prompt = 2;\n  string extra = 9;", 1))
    assert gen.main(tree.args("--check")) == 1
    assert "differs" in capsys.readouterr().err


def test_protoc_error_is_reported(tmp_path: Path, capsys) -> None:
    gen = _load_gen()
    (tmp_path / "p" / "x").mkdir(parents=True)
    (tmp_path / "p" / "x" / "bad.proto").write_text('syntax = "proto3"; message {')
    assert gen.main(["--proto-root", str(tmp_path / "p"), "--server-out", str(tmp_path / "o"),
                     "--client-out", str(tmp_path / "c")]) == 2
    assert "protoc exited" in capsys.readouterr().err
