#!/usr/bin/env python3
"""Compile every .proto under protos/ into Python modules for the two distributions.

    python scripts/gen_protos.py            # (re)generate the *_pb2*.py(i) files
    python scripts/gen_protos.py --check    # exit 1 if the committed files are stale

The public API (`protos/avatarserve/v1/*.proto`) belongs to the client distribution:
`protos/avatarserve/v1/x.proto` becomes `clients/python/avatarserve_client/v1/x_pb2.py`,
`x_pb2_grpc.py` and `x_pb2.pyi`, importable as `avatarserve_client.v1.x_pb2` (a name that cannot
clash with the server's `avatarserve` package). protoc names modules after the proto path
(`avatarserve.v1.x_pb2`), so the generated Python is rewritten to the client's import path:
`from avatarserve.v1 import ...` lines (in .py and .pyi) and the module name the message
classes are registered under (which pickling uses). Proto package and wire names
(`avatarserve.v1.AvatarService`) are unchanged.

Every other proto (the internal stage protocol, `protos/avatarserve/stage/v1/*.proto`) stays in
the server: it becomes `services/avatarserve/stage/v1/x_pb2.py` etc., importable as
`avatarserve.stage.v1.x_pb2` because `services/` is the package root.

Missing `__init__.py` files are created empty in generated package directories; existing ones
(notably `services/avatarserve/__init__.py` and `clients/python/avatarserve_client/__init__.py`)
are never touched.

The generated code embeds the grpcio-tools / protoc versions, so `--check` is only meaningful
with the grpcio-tools version that produced the committed files (printed on failure).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROTO_ROOT = REPO_ROOT / "protos"
DEFAULT_SERVER_OUT = REPO_ROOT / "services"
DEFAULT_CLIENT_OUT = REPO_ROOT / "clients" / "python"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
# Proto directories (under the proto root) whose code ships in the client distribution, and the
# Python package directory (under the client output root) each one is generated into.
CLIENT_PACKAGES = {Path("avatarserve/v1"): Path("avatarserve_client/v1")}
# Never searched for stale generated files: caches, build trees, virtual environments.
SKIP_DIRS = frozenset({"__pycache__", "build", "dist", ".venv", "venv", ".git"})


class ProtoGenError(RuntimeError):
    """protoc failed or the inputs are unusable."""


class Generated(NamedTuple):
    """One generated file: where it goes and what it contains."""

    root: Path  # the output root it belongs under (server or client)
    rel: Path  # its path relative to that root
    data: bytes

    @property
    def path(self) -> Path:
        return self.root / self.rel


def find_protos(proto_root: Path) -> list[Path]:
    """All .proto files under proto_root, as paths relative to it, in a stable order."""
    if not proto_root.is_dir():
        raise ProtoGenError(f"proto root {proto_root} is not a directory")
    protos = sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))
    if not protos:
        raise ProtoGenError(f"no .proto files under {proto_root}")
    return protos


def expected_outputs(protos: list[Path]) -> list[Path]:
    """Files protoc writes (relative to its output directory) for the given protos."""
    outs = []
    for proto in protos:
        stem = proto.with_suffix("")
        outs.extend(stem.parent / (stem.name + suffix) for suffix in GENERATED_SUFFIXES)
    return outs


def destination(protoc_rel: Path, server_out: Path, client_out: Path) -> tuple[Path, Path]:
    """(output root, path under it) of a file protoc wrote at `protoc_rel`."""
    for proto_dir, package_dir in CLIENT_PACKAGES.items():
        if protoc_rel.parent == proto_dir or proto_dir in protoc_rel.parents:
            return client_out, package_dir / protoc_rel.relative_to(proto_dir)
    return server_out, protoc_rel


def _dotted(path: Path) -> str:
    return ".".join(path.parts)


def rewrite_imports(text: str) -> str:
    """Point generated code at the client's import path for the client-owned protos.

    protoc names a module after its proto's path (`avatarserve/v1/x.proto` -> `avatarserve.v1.x_pb2`).
    Rewritten: `from avatarserve.v1 import ...` lines (in any generated .py/.pyi, so a server proto
    importing a public one imports the client package) and the module name message classes are
    registered under (their `__module__`, which pickle uses to find them again). Proto package
    and wire names (`avatarserve.v1.AvatarService`, `/avatarserve.v1.AvatarService/...`) stay.
    """
    for proto_dir, package_dir in CLIENT_PACKAGES.items():
        old, new = re.escape(_dotted(proto_dir)), _dotted(package_dir)
        text = re.sub(rf"^(\s*from ){old}(?=[. ])", rf"\g<1>{new}", text, flags=re.MULTILINE)
        text = re.sub(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, '){old}\.", rf"\g<1>{new}.", text)
    return text


def _run_protoc(proto_root: Path, protos: list[Path], out_dir: Path) -> None:
    # Imported lazily so `--help` works without grpcio-tools installed.
    import grpc_tools
    from grpc_tools import protoc

    # grpc_tools ships the well-known types (google/protobuf/*.proto); make them importable.
    wkt_include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{wkt_include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        # protoc maps each file to its path under the -I root, so module names
        # (avatarserve/v1/x.proto -> avatarserve.v1.x_pb2) do not depend on the checkout path.
        *(str(proto_root / p) for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise ProtoGenError(f"protoc exited with status {rc} (see messages above)")


def render(proto_root: Path, server_out: Path, client_out: Path) -> list[Generated]:
    """Run protoc for every proto (in a scratch directory); returns the files to commit."""
    protos = find_protos(proto_root)
    generated = []
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        scratch = Path(tmp)
        _run_protoc(proto_root, protos, scratch)
        protoc_outputs = expected_outputs(protos)
        missing = [o for o in protoc_outputs if not (scratch / o).is_file()]
        if missing:
            raise ProtoGenError(f"protoc did not produce: {', '.join(map(str, missing))}")
        for rel in protoc_outputs:
            root, dest = destination(rel, server_out, client_out)
            text = rewrite_imports((scratch / rel).read_text(encoding="utf-8"))
            generated.append(Generated(root, dest, text.encode("utf-8")))
    return generated


def package_inits(generated: list[Generated]) -> list[Path]:
    """The `__init__.py` of every directory (up to its output root) that must be a package."""
    inits: set[Path] = set()
    for gen in generated:
        parent = gen.rel.parent
        while parent != Path("."):
            inits.add(gen.root / parent / "__init__.py")
            parent = parent.parent
    return sorted(inits)


def _stale_generated(roots: set[Path], wanted: set[Path]) -> list[Path]:
    """Generated-looking files under the output roots that no current proto produces."""
    stale = set()
    for root in roots:
        for suffix in GENERATED_SUFFIXES:
            for path in root.rglob(f"*{suffix}"):
                parts = path.relative_to(root).parts[:-1]
                if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
                    continue
                if path not in wanted:
                    stale.add(path)
    return sorted(stale)


def generate(proto_root: Path, server_out: Path, client_out: Path) -> list[Generated]:
    """Write the generated files (and missing package `__init__.py`s); returns what was written."""
    generated = render(proto_root, server_out, client_out)
    for gen in generated:
        gen.path.parent.mkdir(parents=True, exist_ok=True)
        gen.path.write_bytes(gen.data)
    for init in package_inits(generated):
        if not init.exists():
            init.write_text("")
    return generated


def check(proto_root: Path, server_out: Path, client_out: Path) -> list[str]:
    """Regenerate in memory; return human-readable problems (empty = up to date)."""
    problems: list[str] = []
    generated = render(proto_root, server_out, client_out)
    for gen in generated:
        if not gen.path.is_file():
            problems.append(f"missing: {gen.path}")
        elif gen.path.read_bytes() != gen.data:
            problems.append(f"differs: {gen.path}")
    for init in package_inits(generated):
        if not init.is_file():
            problems.append(f"missing: {init}")
    for path in _stale_generated({server_out, client_out}, {g.path for g in generated}):
        problems.append(f"stale (no .proto produces it): {path}")
    return problems


def _tools_version() -> str:
    import grpc_tools

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("grpcio-tools")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="verify the committed generated files instead of writing them")
    parser.add_argument("--proto-root", type=Path, default=DEFAULT_PROTO_ROOT)
    parser.add_argument("--server-out", type=Path, default=DEFAULT_SERVER_OUT,
                        help="package root of the server distribution (default: services/)")
    parser.add_argument("--client-out", type=Path, default=DEFAULT_CLIENT_OUT,
                        help="package root of the client distribution (default: clients/python/)")
    args = parser.parse_args(argv)
    proto_root = args.proto_root.resolve()
    server_out, client_out = args.server_out.resolve(), args.client_out.resolve()
    try:
        if args.check:
            problems = check(proto_root, server_out, client_out)
            if problems:
                print(f"generated protobuf code is out of date (grpcio-tools {_tools_version()}); "
                      f"run: python scripts/gen_protos.py", file=sys.stderr)
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                return 1
            print(f"generated code is up to date ({len(find_protos(proto_root))} protos)")
            return 0
        generated = generate(proto_root, server_out, client_out)
        # Drop generated files whose .proto was removed, so the tree matches --check.
        for path in _stale_generated({server_out, client_out}, {g.path for g in generated}):
            path.unlink()
            print(f"removed stale {path}")
        for gen in generated:
            print(f"wrote {gen.path}")
        return 0
    except ProtoGenError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
