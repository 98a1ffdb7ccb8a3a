"""Imports run one way: clients -> serve -> engine -> model, and inside serve/ by plane.

Parses every module's imports (lazy ones inside functions included) and fails on an edge the architecture forbids.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1] / "services" / "avatarserve"

# (importer prefix, forbidden imported prefixes)
FORBIDDEN = [
    ("avatarserve.model", ("avatarserve.engine", "avatarserve.serve", "avatarserve.cli", "ray", "grpc", "redis")),
    ("avatarserve.engine", ("avatarserve.serve", "avatarserve.cli", "ray", "grpc", "redis")),
    ("avatarserve.serve.config", ("avatarserve.serve.api", "avatarserve.serve.control", "avatarserve.serve.dataplane",
                                  "avatarserve.serve.deployments", "avatarserve.serve.ops", "avatarserve.serve.builder")),
    ("avatarserve.serve.control", ("avatarserve.serve.api", "avatarserve.serve.dataplane",
                                   "avatarserve.serve.deployments", "avatarserve.serve.builder", "avatarserve.serve.ops")),
    ("avatarserve.serve.dataplane", ("avatarserve.serve.api", "avatarserve.serve.deployments",
                                     "avatarserve.serve.builder", "avatarserve.serve.ops")),
    ("avatarserve.serve.api", ("avatarserve.serve.deployments", "avatarserve.serve.builder",
                               "avatarserve.serve.ops.launcher", "avatarserve.serve.ops.dashboard")),
    ("avatarserve.serve.deployments", ("avatarserve.serve.builder", "avatarserve.serve.ops.launcher")),
    ("avatarserve.serve.ops.metrics", ("avatarserve.serve.",)),
    # serving never needs the training code or the offline quality metrics
    ("avatarserve.serve", ("avatarserve.toy", "avatarserve.quality", "tests")),
    ("avatarserve.engine", ("avatarserve.toy", "avatarserve.quality")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> Iterator[Tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno


def _edges() -> Dict[str, Set[Tuple[str, int]]]:
    out: Dict[str, Set[Tuple[str, int]]] = {}
    for path in ROOT.rglob("*.py"):
        if "__pycache__" in path.parts or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        module = _module_name(path)
        out[module] = set(_imports(path, module))
    return out


def _matches(name: str, prefix: str) -> bool:
    return name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def test_imports_run_one_way() -> None:
    problems = []
    for module, imports in sorted(_edges().items()):
        for importer, forbidden in FORBIDDEN:
            if not _matches(module, importer):
                continue
            for target, line in sorted(imports):
                if any(_matches(target, f) for f in forbidden):
                    problems.append(f"{module}:{line} imports {target}")
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_checker_sees_a_forbidden_edge(tmp_path, monkeypatch) -> None:
    """The test itself must be able to fail: a model module importing the engine is reported."""
    fake = tmp_path / "avatarserve" / "model"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from ..engine import runners\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "avatarserve")
    with pytest.raises(AssertionError, match=r"avatarserve\.model\.bad:2 imports avatarserve\.engine"):
        test_imports_run_one_way()
