#!/usr/bin/env python3
"""Compile every .proto under protos/ into Python modules under services/.

    python scripts/gen_protos.py            # (re)generate services/**/*_pb2*.py(i)
    python scripts/gen_protos.py --check    # exit 1 if the committed files are stale

`protos/avatarserve/v1/x.proto` becomes `services/avatarserve/v1/x_pb2.py`, `x_pb2_grpc.py`
and `x_pb2.pyi`, importable as `avatarserve.v1.x_pb2` because `services/` is the package root.
Missing `__init__.py` files are created empty in generated package directories; existing ones
(notably `services/avatarserve/__init__.py`) are never touched.

The generated code embeds the grpcio-tools / protoc versions, so `--check` is only meaningful
with the grpcio-tools version that produced the committed files (printed on failure).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROTO_ROOT = REPO_ROOT / "protos"
DEFAULT_OUT_ROOT = REPO_ROOT / "services"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


class ProtoGenError(RuntimeError):
    """protoc failed or the inputs are unusable."""


def find_protos(proto_root: Path) -> list[Path]:
    """All .proto files under proto_root, as paths relative to it, in a stable order."""
    if not proto_root.is_dir():
        raise ProtoGenError(f"proto root {proto_root} is not a directory")
    protos = sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))
    if not protos:
        raise ProtoGenError(f"no .proto files under {proto_root}")
    return protos


def expected_outputs(protos: list[Path]) -> list[Path]:
    """Generated file paths (relative to the output root) for the given protos."""
    outs = []
    for proto in protos:
        stem = proto.with_suffix("")
        outs.extend(stem.parent / (stem.name + suffix) for suffix in GENERATED_SUFFIXES)
    return outs


def _package_dirs(outputs: list[Path]) -> set[Path]:
    """Every directory (relative to the output root) that must be a Python package."""
    dirs: set[Path] = set()
    for out in outputs:
        parent = out.parent
        while parent != Path("."):
            dirs.add(parent)
            parent = parent.parent
    return dirs


def generate(proto_root: Path, out_root: Path) -> list[Path]:
    """Run protoc for every proto; returns the generated files relative to out_root."""
    # Imported lazily so `--help` works without grpcio-tools installed.
    import grpc_tools
    from grpc_tools import protoc

    protos = find_protos(proto_root)
    out_root.mkdir(parents=True, exist_ok=True)
    # grpc_tools ships the well-known types (google/protobuf/*.proto); make them importable.
    wkt_include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{wkt_include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--pyi_out={out_root}",
        # protoc maps each file to its path under the -I root, so module names
        # (avatarserve/v1/x.proto -> avatarserve.v1.x_pb2) do not depend on the checkout path.
        *(str(proto_root / p) for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise ProtoGenError(f"protoc exited with status {rc} (see messages above)")

    outputs = expected_outputs(protos)
    missing = [o for o in outputs if not (out_root / o).is_file()]
    if missing:
        raise ProtoGenError(f"protoc did not produce: {', '.join(map(str, missing))}")
    for pkg in sorted(_package_dirs(outputs)):
        init = out_root / pkg / "__init__.py"
        if not init.exists():
            init.write_text("")
    return outputs


def _stale_generated(out_root: Path, wanted: set[Path]) -> list[Path]:
    """Generated-looking files under out_root that no current proto produces."""
    stale = []
    for suffix in GENERATED_SUFFIXES:
        for path in out_root.rglob(f"*{suffix}"):
            rel = path.relative_to(out_root)
            if rel not in wanted and "__pycache__" not in rel.parts:
                stale.append(rel)
    return sorted(stale)


def check(proto_root: Path, out_root: Path) -> list[str]:
    """Regenerate into a temp dir; return human-readable problems (empty = up to date)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        tmp_root = Path(tmp)
        outputs = generate(proto_root, tmp_root)
        for rel in outputs:
            committed = out_root / rel
            if not committed.is_file():
                problems.append(f"missing: {committed}")
            elif not filecmp.cmp(committed, tmp_root / rel, shallow=False):
                problems.append(f"differs: {committed}")
        for pkg in sorted(_package_dirs(outputs)):
            if not (out_root / pkg / "__init__.py").is_file():
                problems.append(f"missing: {out_root / pkg / '__init__.py'}")
        for rel in _stale_generated(out_root, set(outputs)):
            problems.append(f"stale (no .proto produces it): {out_root / rel}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="verify the committed generated files instead of writing them")
    parser.add_argument("--proto-root", type=Path, default=DEFAULT_PROTO_ROOT)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_ROOT)
    args = parser.parse_args(argv)
    proto_root, out_root = args.proto_root.resolve(), args.out.resolve()
    try:
        if args.check:
            problems = check(proto_root, out_root)
            if problems:
                import grpc_tools

                version = getattr(grpc_tools, "__version__", None)
                if version is None:
                    from importlib.metadata import version as _v

                    version = _v("grpcio-tools")
                print(f"generated protobuf code is out of date (grpcio-tools {version}); "
                      f"run: python scripts/gen_protos.py", file=sys.stderr)
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                return 1
            print(f"generated code is up to date ({len(find_protos(proto_root))} protos)")
            return 0
        outputs = generate(proto_root, out_root)
        # Drop generated files whose .proto was removed, so the tree matches --check.
        for rel in _stale_generated(out_root, set(outputs)):
            (out_root / rel).unlink()
            print(f"removed stale {rel}")
        for rel in outputs:
            print(f"wrote {out_root / rel}")
        return 0
    except ProtoGenError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
