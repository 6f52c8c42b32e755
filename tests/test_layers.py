"""The house's layers: outside racebench/methods/ no code names a method or a knob, and the registry alone knows
them."""

import ast
from pathlib import Path

from racebench.methods import list_methods

PACKAGE = Path(__file__).resolve().parents[1] / "racebench"


def _code_strings(tree: ast.AST):
    """String constants that are code, not prose: docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_code_outside_methods_names_a_method_or_a_knob():
    names = {m.name for m in list_methods()} | {k.name for m in list_methods() for k in m.knobs}
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "methods":
            continue
        tree = ast.parse(path.read_text())
        for node in _code_strings(tree):
            if node.value in names:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
        for node in ast.walk(tree):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                       [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                family = module.split(".")[2] if module.startswith("racebench.methods.") else None
                if family not in (None, "registry") and rel != Path("__init__.py"):
                    found.append(f"{rel}:{node.lineno}: imports {module}")
    assert not found, "\n".join(found)


def test_the_check_catches_a_method_name(tmp_path):
    tree = ast.parse('def f():\n    """Docstrings may say race."""\n    return "flash"\n')
    assert [n.value for n in _code_strings(tree)] == ["flash"]


def test_views_results_and_the_api_import_no_torch():
    import subprocess
    import sys

    modules = ["racebench", "racebench.api", "racebench.cli", "racebench.methods.registry"]
    modules += [f"racebench.{p.parent.name}.{p.stem}" for folder in ("views", "results")
                for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__"]
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
