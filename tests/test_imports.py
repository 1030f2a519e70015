"""Every jaxdeblur module imports on its own, and none hides an import cycle in a function.

An import inside a function that dodges a cycle works in whatever order a test suite
happens to import things and fails in another; these tests import each module first thing
in a fresh interpreter, and read the source for function-level imports of the package.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxdeblur"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = [_module_name(path) for path in SOURCES]


def test_the_package_has_its_modules():
    assert {"jaxdeblur.convert", "jaxdeblur.flow", "jaxdeblur.nets.ufpnet", "jaxdeblur.cli",
            "jaxdeblur.train.ufpnet", "jaxdeblur.train.mcem"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    """``python -c "import <module>"`` in a fresh interpreter (no cycle, no order)."""
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                         text=True, timeout=120, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-3000:]


def _imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        # A relative import (level > 0) is an import of the package itself.
        return ["jaxdeblur." + (node.module or "") if node.level else node.module or ""]
    return []


def _function_level_imports(tree: ast.AST):
    """(line, name) of every import statement inside a function body (at any depth)."""
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(function):
                for name in _imported_names(node):
                    yield node.lineno, name


@pytest.mark.parametrize("path", SOURCES, ids=MODULES)
def test_no_function_level_import_of_the_package(path):
    """Imports of jaxdeblur modules sit at module level. Function-level imports stay
    allowed for optional heavy dependencies (torch)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    hidden = [f"{path.name}:{line} imports {name}" for line, name in
              _function_level_imports(tree) if name.split(".")[0] == "jaxdeblur"]
    assert not hidden, "import these at module level (a cycle to break?): " + "; ".join(hidden)


@pytest.mark.parametrize("path", SOURCES, ids=MODULES)
def test_the_library_imports_no_script_or_pipeline(path):
    """Data flows data_pipelines -> train_scripts -> jaxdeblur (STYLE.md)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = [name for node in ast.walk(tree) for name in _imported_names(node)]
    assert not [n for n in names if n.split(".")[0] in ("data_pipelines", "train_scripts")]


def test_the_checks_see_a_function_level_import():
    source = "import os\n\ndef f():\n    from jaxdeblur import flow\n    import torch\n"
    found = list(_function_level_imports(ast.parse(source)))
    assert found == [(4, "jaxdeblur"), (5, "torch")]
