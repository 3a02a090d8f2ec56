"""The package's shape, read from its source: no import cycles, models independent of the
samplers, no module reaching into another's private names, and a request's keyword list written once."""
import ast
import dataclasses
import inspect
from pathlib import Path

import fastdiff
from fastdiff.engine import Engine
from fastdiff.pipeline import Pipeline
from fastdiff.requests import EditRequest, GenerateRequest

PACKAGE = Path(fastdiff.__file__).parent
REPO = PACKAGE.parent


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


# -- private names ---------------------------------------------------------------------------------

def _our_modules() -> set[str]:
    """Top-level names of this project's modules: the package, and the scripts of tools/, bench/, tests/."""
    return {"fastdiff"} | {p.stem for folder in ("tools", "bench", "tests") for p in (REPO / folder).glob("*.py")}


def _first_private(name: str) -> tuple[str, str] | None:
    """For a dotted name with a private part, (the name up to its first private part, the module that
    part belongs to): `fastdiff.ops._dispatch._warned` -> (`fastdiff.ops._dispatch`, `fastdiff.ops`)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i + 1]), ".".join(parts[:i])
    return None


def _private_uses(path: Path, ours: set[str]) -> set[str]:
    """The private names of other modules that `path` imports or reads: `from x import _y`, `from x._y
    import z`, `m._y` and `setattr(m, "_y", ...)` for a module `m` of this project."""
    in_package = path.is_relative_to(PACKAGE)
    module = ".".join(path.relative_to(REPO).with_suffix("").parts) if in_package else path.stem
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    aliases, used = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for a in node.names:
                aliases[a.asname or a.name] = f"{base}.{a.name}"
                used.add(f"{base}.{a.name}")

    def dotted(node) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = dotted(node.value)
            return owner and f"{owner}.{node.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.add(dotted(node))
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and len(node.args) >= 2
              and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) == "setattr"
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            owner = dotted(node.args[0])
            used.add(owner and f"{owner}.{node.args[1].value}")
    private = (_first_private(name) for name in used if name and name.split(".")[0] in ours)
    return {found for found, owner in filter(None, private) if owner not in (module, package)}


def test_no_module_reaches_into_another_modules_private_names():
    """Across fastdiff/ (kernels/ through its link), tools/, bench/ and tests/: a module's private
    names and private modules are its own and its package's."""
    ours = _our_modules()
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE / "kernels").glob("*.py"),  # rglob does not follow the link
             *(p for folder in ("tools", "bench", "tests") for p in (REPO / folder).glob("*.py"))]
    found = {(str(path.relative_to(REPO)), name) for path in files for name in _private_uses(path, ours)}
    # no exceptions, tests included: what they need has a public door (cpp_build.load / build for the
    # binding and a build as on first use, ops.simulate_unavailable, fastdiff.reset_warnings)
    assert not found, f"private names of other modules in use: {sorted(found)}"


def test_request_keywords_are_written_once():
    """Pipeline.generate/edit and Engine.submit_* take exactly the request dataclasses' fields."""
    for method, request_class, extra in ((Pipeline.generate, GenerateRequest, {"self", "progress"}),
                                         (Pipeline.edit, EditRequest, {"self", "progress"})):
        fields = {f.name for f in dataclasses.fields(request_class)}
        assert set(inspect.signature(method).parameters) == fields | extra
    # the engine forwards **options to the same dataclasses; an unknown keyword names itself
    source = inspect.getsource(Engine.submit_generate) + inspect.getsource(Engine.submit_edit)
    assert "build_request(GenerateRequest" in source and "build_request(EditRequest" in source
