"""The house rules of the layout (README, "Layout"), read from the source with `ast`: no import circle between the
package's modules (imports inside functions included), the core never imports the application (`app/`) or the
command line (`cli/`), and nothing outside `cli/` imports `cli/`."""

import ast
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "modeling_streetclip"
APPLICATION = f"{PACKAGE}.app"
COMMAND_LINE = f"{PACKAGE}.cli"
# The folders whose Python files are walked: the package, and the scripts run from the checkout.
WALKED = (PACKAGE, "training", "eval", "model_card")


def module_name(path: Path, root: Path) -> str:
    """The dotted name of a file under `root`: `modeling_streetclip/app/batch.py` -> `modeling_streetclip.app.batch`
    (a package's `__init__.py` is the package); a script gets one too (`eval.benchmark`), which no import names."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules that the file `path` (module `name`) imports anywhere in it, in functions and `TYPE_CHECKING`
    blocks too, relative imports resolved. `from package import name` counts as importing the submodule where
    `package.name` is a module of `known`."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from .x import` in a package's __init__ is relative to the package itself, elsewhere to the parent.
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {target})
    return found


def import_graph(root: Path, folders=WALKED) -> dict[str, set[str]]:
    """Every walked file's module name -> the modules it imports."""
    paths = {
        module_name(path, root): path
        for folder in folders
        for path in sorted((root / folder).rglob("*.py"))
        if "__pycache__" not in path.parts
    }
    known = set(paths)
    return {name: imported_modules(path, name, known) for name, path in paths.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the modules of `graph` (a list that starts and ends with the same module), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every module below it is checked

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module] & graph.keys()):
            if state.get(imported) == "open":
                return path[path.index(imported) :] + [imported]
            if imported not in state:
                circle = visit(imported, path + [imported])
                if circle:
                    return circle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module, [module])
            if circle:
                return circle
    return None


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def core_modules(root: Path) -> set[str]:
    """The core: the package and the modules directly in its folder, which `save_pretrained` ships flat."""
    return {module_name(path, root) for path in (root / PACKAGE).glob("*.py")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO_ROOT)


def test_the_walk_sees_the_imports_it_checks(graph):
    """The rules below mean something only if the walk finds imports where there are some, lazy ones included."""
    assert f"{PACKAGE}.decisions" in graph[f"{PACKAGE}.pipeline_geolocation"]
    assert f"{PACKAGE}.app.batch" in graph[f"{PACKAGE}.cli.locate"]  # imported inside a function
    assert f"{PACKAGE}.app.sources" in graph[f"{PACKAGE}.app.benchmark_data"]
    assert {f"{PACKAGE}.cli.index", f"{PACKAGE}.cli.locate"} <= graph[COMMAND_LINE]  # `from . import index, locate`


def test_no_import_circle_between_the_packages_modules(graph):
    package = {module: imports for module, imports in graph.items() if is_within(module, PACKAGE)}
    circle = find_circle(package)
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_the_core_never_imports_the_application_or_the_command_line(graph):
    offending = {
        module: sorted(
            imported for imported in imports if is_within(imported, APPLICATION) or is_within(imported, COMMAND_LINE)
        )
        for module, imports in graph.items()
        if module in core_modules(REPO_ROOT)
    }
    assert {module: imports for module, imports in offending.items() if imports} == {}


def test_nothing_outside_the_command_line_imports_it(graph):
    offending = {
        module: sorted(imported for imported in imports if is_within(imported, COMMAND_LINE))
        for module, imports in graph.items()
        if not is_within(module, COMMAND_LINE)
    }
    assert {module: imports for module, imports in offending.items() if imports} == {}


def test_core_modules_import_each_other_as_flat_relatives():
    """A folder saved for `trust_remote_code` holds the core's files side by side, and transformers copies the ones
    a file imports as `from .x import y`: an absolute import of the package, or `from . import x`, would be missing
    there."""
    offending = []
    for path in sorted((REPO_ROOT / PACKAGE).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            absolute = isinstance(node, ast.Import) and any(is_within(alias.name, PACKAGE) for alias in node.names)
            absolute |= isinstance(node, ast.ImportFrom) and not node.level and is_within(node.module or "", PACKAGE)
            unnamed = isinstance(node, ast.ImportFrom) and node.level and (node.level > 1 or node.module is None)
            if absolute or (unnamed and path.name != "__init__.py"):
                offending.append(f"{path.name}:{node.lineno}")
    assert offending == []


def test_the_checks_find_a_circle_through_a_lazy_import_and_an_application_import(tmp_path):
    """The checks themselves, on a made-up package: a circle closed by an import inside a function, and a core module
    that imports the application."""
    package = tmp_path / PACKAGE
    (package / "app").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "app" / "__init__.py").write_text("")
    (package / "first.py").write_text("from .second import thing\n")
    (package / "second.py").write_text("def thing():\n    from .first import other\n")
    (package / "third.py").write_text("from .app import helper\n")

    graph = import_graph(tmp_path, folders=(PACKAGE,))

    assert find_circle(graph) == [f"{PACKAGE}.first", f"{PACKAGE}.second", f"{PACKAGE}.first"]
    assert graph[f"{PACKAGE}.third"] == {APPLICATION}
    assert f"{PACKAGE}.third" in core_modules(tmp_path) and APPLICATION not in core_modules(tmp_path)
