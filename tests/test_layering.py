"""Layering: p2pd/oci is pure (values in, values out) and imports no I/O or async library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import p2pd.oci

OCI_DIR = Path(p2pd.oci.__file__).parent

# Top-level modules that do I/O, networking or concurrency.
FORBIDDEN = {
    "trio",
    "anyio",
    "asyncio",
    "httpx",
    "httpcore",
    "h11",
    "zeroconf",
    "socket",
    "ssl",
    "select",
    "selectors",
    "os",
    "io",
    "shutil",
    "tempfile",
    "pathlib",
    "subprocess",
    "threading",
    "multiprocessing",
    "mmap",
    "fcntl",
    "signal",
    "urllib",
    "http",
    "seed",
}
# p2pd modules outside the pure core (the HTTP server, daemon, ...) are off limits too.
ALLOWED_P2PD = "p2pd.oci"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, including function-level ones."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "p2pd.oci"
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            found.append((node.lineno, "__import__"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module":
            found.append((node.lineno, "importlib.import_module"))
    return found


MODULES = sorted(OCI_DIR.glob("*.py"))


def test_core_modules_found() -> None:
    names = {p.stem for p in MODULES}
    assert {"grammar", "digest", "errors", "ranges", "manifest", "chunkmap", "mediatypes"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_oci_module_is_pure(path: Path) -> None:
    violations = []
    for line, module in _imports(path):
        top = module.split(".")[0]
        dynamic = module in ("__import__", "importlib.import_module")
        outside_core = top == "p2pd" and not (module == ALLOWED_P2PD or module.startswith(ALLOWED_P2PD + "."))
        if dynamic or top in FORBIDDEN or outside_core:
            violations.append((line, module))
    assert not violations, f"{path.name} imports I/O or non-core modules: {violations}"


def test_import_walker_sees_nested_and_relative_imports() -> None:
    # Guard against a walker that silently finds nothing.
    found = {module for path in MODULES for _, module in _imports(path)}
    assert "p2pd.oci.errors" in found  # "from .errors import OCIError"
    assert "p2pd.oci.digest" in found  # function-level "from .digest import Digest" in grammar.py
    assert "hashlib" in found
