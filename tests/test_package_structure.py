"""The package's shape, read from its source: no import cycles, models independent of the
samplers, the engine on public names only, and a request's keyword list written once."""
import ast
import dataclasses
import inspect
from pathlib import Path

import fastdiff
from fastdiff.engine import Engine
from fastdiff.pipeline import Pipeline
from fastdiff.requests import EditRequest, GenerateRequest

PACKAGE = Path(fastdiff.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules) -> set[str]:
    """fastdiff modules that `name` imports, at module level or inside functions (lazy imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for alias in node.names:  # `from fastdiff import ops` imports the module fastdiff.ops
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def test_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 20  # the walk saw the package


def test_models_do_not_import_samplers():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("fastdiff.models"):
            assert "fastdiff.samplers" not in _imports(name, path, modules), name


def test_engine_uses_only_public_names_of_other_modules():
    tree = ast.parse((PACKAGE / "engine.py").read_text())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            private += [alias.name for alias in node.names if alias.name.startswith("_") and alias.name != "__future__"]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                private.append(ast.unparse(node))
    assert not private, f"engine.py reaches into private names: {private}"


def test_request_keywords_are_written_once():
    """Pipeline.generate/edit and Engine.submit_* take exactly the request dataclasses' fields."""
    for method, request_class, extra in ((Pipeline.generate, GenerateRequest, {"self", "progress"}),
                                         (Pipeline.edit, EditRequest, {"self", "progress"})):
        fields = {f.name for f in dataclasses.fields(request_class)}
        assert set(inspect.signature(method).parameters) == fields | extra
    # the engine forwards **options to the same dataclasses; an unknown keyword names itself
    source = inspect.getsource(Engine.submit_generate) + inspect.getsource(Engine.submit_edit)
    assert "build_request(GenerateRequest" in source and "build_request(EditRequest" in source
