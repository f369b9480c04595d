"""The layout issue 11 set up, kept true: the two backend packages mirror each other, the core
imports no framework, the tools reach backends only through their public adapters, nothing
imports in a cycle, and no file or function grows past the agreed size."""

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "dualsn")
BACKENDS = ("torch", "paddle")
CORE = ("spec", "norms", "reference", "options", "keys", "layout", "geometry", "patching", "diagnostics", "adapter_common")
TOOLS = ("port", "report", "cli", "demo", "adapters")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def _python_files(top: str):
    for folder, _, files in os.walk(top):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _layer(module: str) -> str:
    """The top-level part of dualsn a module belongs to: "spec", "torch", "port"..."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, roots=("dualsn",)) -> set[str]:
    """Every module under ``roots`` that ``path`` imports, at module level or inside a function."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = _module_name(path) if path.endswith("__init__.py") else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in roots}


def _graph(roots=("dualsn",)) -> dict[str, set[str]]:
    modules = {_module_name(p): p for root in roots for p in _python_files(os.path.join(ROOT, root))}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, roots):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def test_backend_packages_have_the_same_files():
    files = {b: sorted(os.listdir(os.path.join(PACKAGE, b))) for b in BACKENDS}
    files = {b: [f for f in names if f.endswith(".py")] for b, names in files.items()}
    assert files["torch"] == files["paddle"]
    assert "adapter.py" in files["torch"]


def test_backend_packages_export_the_same_names():
    pytest.importorskip("torch")
    pytest.importorskip("paddle")
    import dualsn.paddle
    import dualsn.torch

    assert sorted(dualsn.torch.__all__) == sorted(dualsn.paddle.__all__)
    assert sorted(dualsn.torch.adapter.__all__) == sorted(dualsn.paddle.adapter.__all__)
    for backend in (dualsn.torch, dualsn.paddle):
        for name in backend.__all__ + [f"adapter.{n}" for n in backend.adapter.__all__]:
            obj = backend
            for part in name.split("."):
                obj = getattr(obj, part)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_conformance_and_drivers_have_no_import_cycle():
    """conformance.golden and conformance.runner used to import each other."""
    graph = _graph(("conformance", "backends"))
    assert "conformance.golden_store" in graph["conformance.runner"]
    assert _cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"]]


def test_core_and_backends_import_no_tool():
    graph = _graph()
    for name, targets in graph.items():
        if _layer(name) in CORE or _layer(name) in BACKENDS:
            tools = sorted(t for t in targets if _layer(t) in TOOLS)
            assert tools == [], f"{name} imports the tools {tools}"


def test_tools_use_no_private_backend_name():
    pattern = re.compile(r"dualsn\.(torch|paddle)\._|\b(dsn|dt|dp)\._[a-z]")
    for path in _python_files(PACKAGE):
        name = _module_name(path)
        if _layer(name) in TOOLS:
            text = open(path, encoding="utf-8").read()
            assert not pattern.search(text), f"{name} uses a private backend name"
            for imported in _imports(path):
                parts = imported.split(".")
                if len(parts) > 2 and parts[1] in BACKENDS:
                    assert parts[2] == "adapter", f"{name} imports {imported}"


def test_core_imports_no_framework():
    code = textwrap.dedent(f"""
        import sys
        for name in {CORE!r} + ("adapters",):
            __import__("dualsn." + name)
        print(",".join(sorted(m for m in ("torch", "paddle") if m in sys.modules)) or "none")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "none"


def _docstring_lines(node) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def test_files_and_functions_stay_small():
    """Files up to 500 lines; functions up to 60, not counting their docstrings."""
    too_long = []
    for path in _python_files(PACKAGE):
        lines = open(path, encoding="utf-8").read().splitlines()
        if len(lines) > MAX_FILE_LINES:
            too_long.append(f"{_module_name(path)}: {len(lines)} lines")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{_module_name(path)}.{node.name}: {length} lines")
    assert too_long == []


def test_each_fact_has_one_home():
    """The default eps, the parametrization key layout and the hook's W name are each written
    in one core module only."""
    homes = {r"1e-12": {"dualsn/spec.py"}, r"parametrizations\.\{|\"parametrizations\.": {"dualsn/keys.py"},
             r"\"_orig\"": {"dualsn/keys.py"}}
    for pattern, allowed in homes.items():
        found = set()
        for path in _python_files(PACKAGE):
            for line in open(path, encoding="utf-8"):
                code = line.split("#")[0]
                if re.search(pattern, code):
                    found.add(os.path.relpath(path, ROOT))
        assert found <= allowed, (pattern, found - allowed)
