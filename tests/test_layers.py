"""The import graph keeps the layer order: no circles, no upward import, nobody imports a CLI.

Reads every ``import`` (at any depth, so a lazy import inside a function counts too)
with ``ast``; nothing is imported or run. Layers, lowest first (README, Architecture):

    base (errors, config, files, runtime, weights, tokenizer, schedulers) -> models ->
    conditioning, presets -> pipeline -> e4t -> training -> recipes -> cli

A module may import its own layer or lower ones. ``training`` is generic: it imports
nothing from ``e4t``. The command-line programs (``train/``, ``infer/``) are imported
by no library module, test helper, notebook, benchmark or other command-line program.
"""
import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (
    ("e4t_jax", "e4t_jax.errors", "e4t_jax.config", "e4t_jax.files", "e4t_jax.runtime", "e4t_jax.weights",
     "e4t_jax.tokenizer", "e4t_jax.schedulers", "e4t_jax.digits"),
    ("e4t_jax.models",),
    ("e4t_jax.conditioning", "e4t_jax.presets"),
    ("e4t_jax.pipeline", "e4t_jax.diffusion"),
    ("e4t_jax.e4t", "e4t_jax.baselines", "e4t_jax.eval"),
    ("e4t_jax.training",),
    ("e4t_jax.recipes",),
    ("e4t_jax.cli",),
)
FORBIDDEN = {("e4t_jax.training", "e4t_jax.e4t"): "training/ is generic: a step takes any loss"}
CLI_PACKAGES = ("train", "infer")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``source`` imports, ``from a import b`` as both ``a`` and ``a.b``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def library_graph() -> dict[str, set[str]]:
    """``e4t_jax`` module -> the ``e4t_jax`` modules it imports."""
    files = {module_name(path): path for path in (ROOT / "e4t_jax").rglob("*.py")}
    graph = {}
    for module, path in files.items():
        names = imported_names(path.read_text(), module, path.name == "__init__.py")
        graph[module] = {name for name in names if name in files and name != module}
    return graph


def layer(module: str) -> int:
    """Index in :data:`LAYERS` of the longest prefix that names ``module``'s layer."""
    matches = [(len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS (and to the README's map)")
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a higher layer, or of a forbidden pair."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            forbidden = [why for (src, dst), why in FORBIDDEN.items()
                         if module.startswith(src) and target.startswith(dst)]
            if layer(target) > layer(module) or forbidden:
                bad.append(f"{module} -> {target}" + (f" ({forbidden[0]})" if forbidden else ""))
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, a]``) or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def notebook_sources(path: Path) -> str:
    """The code cells of a notebook as one Python source (IPython magics become ``pass``)."""
    def python(line):
        code = line.lstrip()
        return line[:len(line) - len(code)] + "pass" if code.startswith(("%", "!")) else line

    cells = json.loads(path.read_text())["cells"]
    return "\n".join("\n".join(map(python, "".join(cell["source"]).splitlines()))
                     for cell in cells if cell["cell_type"] == "code")


def cli_imports(source: str, module: str) -> list[str]:
    return sorted(name for name in imported_names(source, module, False)
                  if name.split(".")[0] in CLI_PACKAGES and name != module)


# ----------------------------------------------------------------------------- the tree


def test_library_has_no_import_circle():
    assert find_cycle(library_graph()) is None, " -> ".join(find_cycle(library_graph()))


def test_library_imports_only_downward():
    assert upward_imports(library_graph()) == []


def test_models_and_pipeline_know_nothing_of_the_method_or_training():
    graph = library_graph()
    base = [m for m in graph if m.startswith("e4t_jax.models") or m == "e4t_jax.pipeline"]
    assert base and all(not t.startswith(("e4t_jax.e4t", "e4t_jax.training")) for m in base for t in graph[m])


def test_nothing_imports_a_command_line_program():
    sources = {module_name(path): path.read_text() for path in (ROOT / "e4t_jax").rglob("*.py")}
    sources.update({module_name(path): path.read_text() for package in CLI_PACKAGES + ("bench",)
                    for path in (ROOT / package).glob("*.py")})
    sources.update({f"tests.{path.stem}": path.read_text() for path in (ROOT / "tests").glob("*.py")
                    if not path.name.startswith("test_")})  # helpers: conftest, workers
    sources.update({f"notebooks/{path.name}": notebook_sources(path) for path in (ROOT / "notebooks").glob("*.ipynb")})
    offenders = {name: found for name, source in sources.items() if (found := cli_imports(source, name))}
    assert offenders == {}


# ------------------------------------------------------------ the checks see violations


def test_a_circle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("module, target", [
    ("e4t_jax.pipeline", "e4t_jax.e4t.offsets"),
    ("e4t_jax.models.unet", "e4t_jax.pipeline"),
    ("e4t_jax.presets", "e4t_jax.e4t.model"),
    ("e4t_jax.e4t.concept", "e4t_jax.training.checkpoint"),
    ("e4t_jax.training.steps", "e4t_jax.e4t.model"),
    ("e4t_jax.files", "e4t_jax.cli"),
])
def test_an_upward_import_is_found(module, target):
    assert len(upward_imports({module: {target}})) == 1


def test_the_imports_of_a_module_are_read_at_any_depth():
    source = "import os\nfrom . import offsets\n\ndef f():\n    from e4t_jax.training import steps\n"
    names = imported_names(source, "e4t_jax.e4t.model", False)
    assert {"e4t_jax.e4t.offsets", "e4t_jax.training.steps"} <= names
    assert cli_imports("def main():\n    from infer.personalize import main\n", "infer.demo") == [
        "infer.personalize", "infer.personalize.main"]
