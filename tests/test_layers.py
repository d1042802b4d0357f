"""The packages' layering, read from every module's imports (the AST, so that a lazy import inside a
function counts too): the trainer package never imports the operator, and the contract package
(g2rpo.api) imports nothing above it."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "trainer" / "g2rpo"
API = TRAINER / "api"


def imported_modules(path: Path, source_root: Path = ROOT / "trainer") -> Iterator[tuple[int, str]]:
    """(line, module) of every import in the file, relative imports resolved, `importlib.import_module`
    and `__import__` of a literal name included."""
    package = ".".join(path.relative_to(source_root).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            yield node.lineno, base
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def offending(root: Path, allowed) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted(root.rglob("*.py"))
        for line, module in imported_modules(path)
        if not allowed(module)
    ]


def test_nothing_in_the_trainer_package_imports_the_operator():
    found = offending(TRAINER, lambda module: module.split(".")[0] != "g2rpo_operator")
    assert not found, "the operator's code is reached through the g2rpo.verbs entry points only:\n" + "\n".join(found)


CONTRACT_MAY_IMPORT = ("pydantic", "yaml", "g2rpo.api")
"""Besides the standard library. No other g2rpo package: what the contract needs of one (the table of
bundled models, say) moves down into g2rpo.api."""


def contract_allows(module: str) -> bool:
    top = module.split(".")[0]
    return (
        top in sys.stdlib_module_names
        or top == "__future__"
        or any(module == name or module.startswith(name + ".") for name in CONTRACT_MAY_IMPORT)
    )


def test_the_contract_package_imports_nothing_above_it():
    found = offending(API, contract_allows)
    assert not found, "g2rpo.api is the bottom layer:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from g2rpo.models.bundled import BUNDLED_MODELS",  # the import issue 16.13 found in api/crd.py
        "import g2rpo.train",
        "from ..local import run",
        "def f():\n    from g2rpo.controller import service",
        "import torch",
    ],
)
def test_the_contract_check_refuses_an_import_from_above(tmp_path, source):
    """The check itself fails on each way g2rpo.api could reach up (a test that cannot fail proves nothing)."""
    module = tmp_path / "g2rpo" / "api" / "probe.py"
    module.parent.mkdir(parents=True)
    module.write_text(source)
    assert [name for _, name in imported_modules(module, source_root=tmp_path) if not contract_allows(name)]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import g2rpo_operator.kube", "g2rpo_operator.kube"),
        ("def f():\n    from g2rpo_operator import render", "g2rpo_operator"),
        ("import importlib\nimportlib.import_module('g2rpo_operator.render')", "g2rpo_operator.render"),
        ("from . import spec", "g2rpo.api"),
        ("from ..models import bundled", "g2rpo.models"),
    ],
)
def test_the_import_walk_sees_lazy_dynamic_and_relative_imports(tmp_path, source, expected):
    module = tmp_path / "g2rpo" / "api" / "probe.py"
    module.parent.mkdir(parents=True)
    module.write_text(source)
    assert expected in [name for _, name in imported_modules(module, source_root=tmp_path)]
