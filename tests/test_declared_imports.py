"""Every third-party import of the project is declared in pyproject.toml.

A package that happens to be installed on a development machine hides a missing dependency: the
code works there and fails on a fresh machine. This test reads every import of the project's
Python files (lazy imports inside functions included) and fails for each imported distribution
that is not reachable from the requirements in pyproject.toml: `dependencies` plus every optional
extra, followed transitively through the installed distributions' metadata.

Not checked: the standard library, the project's own modules, relative imports, and imports in
the body of a `try` whose handlers catch ImportError or ModuleNotFoundError (optional imports).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself requires tomli there
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
# Folders (relative to the project root) whose Python files are checked.
SOURCE_DIRS = ("services", "clients", "tests", "bench", "scripts")
SKIP_DIRS = frozenset({".venv", "venv", ".git", "build", "dist", "__pycache__", "out", "artifacts", "node_modules"})
OPTIONAL_IMPORT_ERRORS = frozenset({"ImportError", "ModuleNotFoundError"})


@dataclass(frozen=True)
class ImportSite:
    module: str  # top-level module name, e.g. "yaml" for `from yaml import safe_load`
    where: str  # "path/relative/to/root.py:line"


@dataclass(frozen=True)
class Undeclared:
    site: ImportSite
    distributions: Tuple[str, ...]  # installed distributions that provide the module; () = none

    def __str__(self) -> str:
        if not self.distributions:
            return (
                f"{self.site.where}: import {self.site.module}: no installed distribution provides it "
                "(not installed here; declare it in pyproject.toml, or guard the import with try/except ImportError)"
            )
        return (
            f"{self.site.where}: import {self.site.module}: distribution {', '.join(self.distributions)} "
            "is not declared in pyproject.toml (nor required by anything declared)"
        )


# ------------------------------------------------------------------------------------------
# What pyproject.toml declares, transitively
# ------------------------------------------------------------------------------------------


def _parse_requirement(text: str) -> Optional[Requirement]:
    try:
        return Requirement(text)
    except InvalidRequirement:
        return None


def _marker_applies(req: Requirement, extras: FrozenSet[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (sorted(extras) or [""]))


def declared_distributions(pyproject: dict) -> Set[str]:
    """Canonical names of the declared distributions and of everything they require (installed metadata)."""
    project = pyproject.get("project", {})
    roots = list(project.get("dependencies", []))
    for reqs in project.get("optional-dependencies", {}).values():
        roots.extend(reqs)
    todo: List[Tuple[str, FrozenSet[str]]] = []
    for text in roots:
        req = _parse_requirement(text)
        if req is not None and _marker_applies(req, frozenset()):
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    seen: Set[Tuple[str, FrozenSet[str]]] = set()
    names: Set[str] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:  # declared but not installed: nothing to follow
            continue
        for text in requires:
            req = _parse_requirement(text)
            if req is not None and _marker_applies(req, extras):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return names


# ------------------------------------------------------------------------------------------
# What the project's files import
# ------------------------------------------------------------------------------------------


def iter_python_files(root: Path, source_dirs: Sequence[str] = SOURCE_DIRS) -> Iterator[Path]:
    for d in source_dirs:
        base = root / d
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if not SKIP_DIRS & set(path.relative_to(root).parts):
                yield path


def _handler_catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:  # bare `except:`
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    names = {t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else "" for t in types}
    return bool(names & OPTIONAL_IMPORT_ERRORS)


def _optional_import_nodes(tree: ast.AST) -> Set[ast.AST]:
    """Import statements inside the body of a `try` that catches ImportError / ModuleNotFoundError."""
    optional: Set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_handler_catches_import_error(h) for h in node.handlers):
            for stmt in node.body:
                optional.update(n for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return optional


def imports_in_file(path: Path, root: Path) -> List[ImportSite]:
    """Unguarded absolute imports of one file, as top-level module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    optional = _optional_import_nodes(tree)
    rel = path.relative_to(root).as_posix()
    sites = []
    for node in ast.walk(tree):
        if node in optional:
            continue
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:  # relative imports are the project's own
            continue
        sites.extend((node.lineno, m.split(".")[0]) for m in modules)
    return [ImportSite(module, f"{rel}:{line}") for line, module in sorted(sites)]


def own_modules(root: Path, source_dirs: Sequence[str] = SOURCE_DIRS) -> Set[str]:
    """Top-level names the project itself provides.

    Every folder that is not inside a package can be an import root (services/, clients/python/,
    a scripts folder run as `python scripts/x.py`, the project root for `tests`): the packages and
    modules directly in it are the project's own.
    """
    names = set()
    todo = [root / d for d in source_dirs if (root / d).is_dir()]
    for d in todo:
        names.add(d.name)
    while todo:
        folder = todo.pop()
        for child in folder.iterdir():
            if child.name in SKIP_DIRS:
                continue
            if child.is_file() and child.suffix == ".py":
                names.add(child.stem)
            elif child.is_dir():
                if (child / "__init__.py").is_file():
                    names.add(child.name)
                else:
                    todo.append(child)  # a plain folder: maybe another import root below it
    return names


# ------------------------------------------------------------------------------------------
# The check
# ------------------------------------------------------------------------------------------


def find_undeclared(root: Path, source_dirs: Sequence[str] = SOURCE_DIRS) -> List[Undeclared]:
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    declared = declared_distributions(pyproject)
    fine = set(sys.stdlib_module_names) | {"__future__"} | own_modules(root, source_dirs)
    providers: Dict[str, List[str]] = md.packages_distributions()
    problems = []
    for path in iter_python_files(root, source_dirs):
        for site in imports_in_file(path, root):
            if site.module in fine:
                continue
            dists = tuple(sorted(set(providers.get(site.module, ()))))
            if not {canonicalize_name(d) for d in dists} & declared:
                problems.append(Undeclared(site, dists))
    return problems


def _report(problems: Iterable[Undeclared]) -> str:
    lines = [str(p) for p in problems]
    return f"{len(lines)} undeclared third-party import(s):\n" + "\n".join(lines)


def test_every_third_party_import_is_declared():
    problems = find_undeclared(REPO)
    if problems:
        pytest.fail(_report(problems), pytrace=False)


def test_checker_reports_undeclared_imports(tmp_path):
    """The checker itself, on a tiny synthetic project: it must be able to fail."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0"\ndependencies = ["numpy>=1"]\n')
    pkg = tmp_path / "services" / "demo"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "app.py").write_text(
        "import os\n"  # stdlib
        "import numpy as np\n"  # declared
        "from demo import helpers\n"  # the project's own
        "from . import helpers as h\n"  # relative
        "try:\n"
        "    import surely_not_a_module_xyz\n"  # guarded: optional
        "except ImportError:\n"
        "    surely_not_a_module_xyz = None\n"
        "\n"
        "\n"
        "def load(path):\n"
        "    import yaml\n"  # lazy, undeclared (PyYAML)
        "    from another_missing_module_xyz import thing\n"  # lazy, not installed at all
        "    return yaml.safe_load(path)\n"
    )
    (pkg / "helpers.py").write_text("")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "tool.py").write_text("import helper_module\n")  # sibling of a script: own
    (scripts / "helper_module.py").write_text("")
    venv = tmp_path / ".venv" / "lib"
    venv.mkdir(parents=True)
    (venv / "ignored.py").write_text("import yaml\n")  # skipped folder

    problems = find_undeclared(tmp_path)

    assert [(p.site.module, p.site.where) for p in problems] == [
        ("yaml", "services/demo/app.py:12"),
        ("another_missing_module_xyz", "services/demo/app.py:13"),
    ]
    yaml_problem, missing = problems
    assert [canonicalize_name(d) for d in yaml_problem.distributions] == ["pyyaml"]
    assert "services/demo/app.py:12: import yaml: distribution PyYAML is not declared" in str(yaml_problem)
    assert missing.distributions == ()
    assert "not installed" in str(missing)

    # Declaring PyYAML (any spelling) fixes it; the not-installed import stays reported.
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "demo"\nversion = "0"\ndependencies = ["numpy>=1"]\n'
        '[project.optional-dependencies]\nextra = ["pyyaml"]\n'
    )
    assert [p.site.module for p in find_undeclared(tmp_path)] == ["another_missing_module_xyz"]


def test_transitive_requirements_count_as_declared(tmp_path):
    """A distribution required by a declared one (here: pytest -> pluggy) is reachable."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0"\ndependencies = ["pytest"]\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("import pluggy\nimport pytest\n")
    assert find_undeclared(tmp_path) == []
