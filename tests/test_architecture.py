"""The package's import graph points one way (issue 17, "Layers point one way").

Read from the source with `ast`, never by importing the modules, so every import counts: the
module-level ones, those inside functions (imported on first use) and those under
`if TYPE_CHECKING:`. Checked:
- no import cycle among hf_relattn modules;
- the library (everything but the app layer: `hf_relattn.cli`, `hf_relattn.demo` and
  `hf_relattn.finetune`) never imports the app layer;
- no private name (`_name`) is imported from, or read off, another module of the package;
- `import hf_relattn` loads neither the Hub code nor finetune.

An edge goes to the module whose code an import runs for the names it asks: `import a.b` and
`from a.b import name` -> `a.b`; `from a import b` where `a.b` is a module -> `a.b`, unless the
`__init__` of `a` binds `b` to something else (`hf_relattn.convert` is the function that
`from .convert import convert` put there) -> `a`; `import hf_relattn` / `from . import
__version__` -> the package's `__init__`. The parents a dotted import also initialises are not
edges (every submodule would otherwise depend on its package's `__init__`). One pattern is not a
cycle: a package `__init__` that imports, at module level, its own submodules which import the
package back for its registry (patches/__init__.py defines `register_adapter`, then imports bert,
llama, vit, which register themselves).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "hf_relattn"
# The application layer at the top: the command line, the demo and the training loop.
APP = ("hf_relattn.cli", "hf_relattn.demo", "hf_relattn.finetune")
# Shipped as hf_relattn.<name> from folders at the repository root (pyproject's package-dir):
# found through the import system, so this works for an editable install and a wheel alike.
MAPPED = ("finetune", "patches", "model_cards")


@dataclass(frozen=True)
class Import:
    """One edge of the graph: `source` imports `names` from module `target` at `line`."""

    source: str
    target: str
    names: tuple[str, ...]  # names taken from target ("" for a plain `import target`)
    line: int
    module_level: bool  # runs when `source` is imported (not inside a function)
    type_only: bool = False  # under `if TYPE_CHECKING:` (a dependency all the same; shown in reports)


@dataclass
class Module:
    """One module of the package: dotted name, file, whether it is a package's `__init__`, syntax tree."""

    name: str
    path: Path
    is_package: bool
    tree: ast.Module


def _folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_modules() -> dict[str, Module]:
    """Every module of the installed package, by dotted name, parsed."""
    modules: dict[str, Module] = {}
    todo = [(PACKAGE, _folder(PACKAGE))]
    seen: set[str] = set()
    while todo:
        name, folder = todo.pop()
        if folder is None or name in seen:
            continue
        seen.add(name)
        for path in sorted(folder.glob("*.py")):
            module = name if path.stem == "__init__" else f"{name}.{path.stem}"
            modules[module] = Module(module, path, path.stem == "__init__", ast.parse(path.read_text(encoding="utf-8"), str(path)))
        for child in sorted(p for p in folder.iterdir() if (p / "__init__.py").is_file()):
            todo.append((f"{name}.{child.name}", child))
        if name == PACKAGE:
            todo += [(f"{PACKAGE}.{sub}", _folder(f"{PACKAGE}.{sub}")) for sub in MAPPED]
    return modules


def _known(name: str, modules: dict[str, Module]) -> str | None:
    """`name` if it is a package module, else its longest prefix that is one (None: outside)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, module_level: bool = True, type_only: bool = False):
    """(import node, module level?, under TYPE_CHECKING?) for every import below `node`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, module_level, type_only
        inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if _is_type_checking(child):  # its `else:` branch runs
            for statement in child.body:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), inner, True)
            for statement in child.orelse:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), inner, type_only)
            continue
        yield from _walk(child, inner, type_only)


def _base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative levels resolved."""
    if not node.level:
        return node.module or ""
    parts = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _shadowing_names(package: str, modules: dict[str, Module]) -> set[str]:
    """Names that the `__init__` of `package` binds to something other than the submodule of that
    name: `from package import name` then gets the package's object, not the submodule (e.g.
    `hf_relattn.convert` is the function, which `from .convert import convert` put there)."""
    module = modules.get(package)
    if module is None or not module.is_package:
        return set()
    names: set[str] = set()
    for node in module.tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, node)
            names.update(a.asname or a.name for a in node.names if f"{base}.{a.name}" != f"{package}.{a.asname or a.name}")
    return names


def module_bindings(module: Module, modules: dict[str, Module]) -> dict[str, str]:
    """Local names that imports of `module` bind to package modules (`from . import bench`,
    `import hf_relattn.bench as B`, `import hf_relattn`): name -> module."""
    bound: dict[str, str] = {}
    for node, _, _ in _walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        else:
            base = _base(module, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules and alias.name not in _shadowing_names(base, modules):
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    return bound


def imports_of(module: Module, modules: dict[str, Module]) -> list[Import]:
    """The edges out of `module` (imports of modules outside the package are dropped)."""
    edges: list[Import] = []
    for node, module_level, type_only in _walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, modules)
                if target:
                    edges.append(Import(module.name, target, ("",), node.lineno, module_level, type_only))
            continue
        base = _base(module, node)
        by_target: dict[str, list[str]] = {}
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            is_submodule = submodule in modules and alias.name not in _shadowing_names(base, modules)
            target = submodule if is_submodule else _known(base, modules)
            if target:
                by_target.setdefault(target, []).append(alias.name)
        for target, names in by_target.items():
            edges.append(Import(module.name, target, tuple(names), node.lineno, module_level, type_only))
    return edges


def import_graph() -> tuple[dict[str, Module], list[Import]]:
    modules = package_modules()
    return modules, [edge for module in modules.values() for edge in imports_of(module, modules)]


def _is_registration(edge: Import, modules: dict[str, Module], edges: list[Import]) -> bool:
    """A package's `__init__` importing its own submodule at module level, which imports the package back."""
    source = modules[edge.source]
    return (
        source.is_package
        and edge.module_level
        and edge.target.startswith(edge.source + ".")
        and any(e.source == edge.target and e.target == edge.source for e in edges)
    )


def find_cycles(modules: dict[str, Module], edges: list[Import]) -> list[list[list[Import]]]:
    """For every strongly connected group of modules (Tarjan), cycles (as their edges) that
    together pass through each of its modules."""
    graph: dict[str, list[Import]] = {name: [] for name in modules}
    for edge in edges:
        if edge.source != edge.target and not _is_registration(edge, modules, edges):
            graph[edge.source].append(edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # recursive: the graph is a few dozen modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return [_cycles_in(group, graph) for group in groups]


def _cycles_in(group: list[str], graph: dict[str, list[Import]]) -> list[list[Import]]:
    """The shortest cycle through each module of a strongly connected group (breadth first),
    each cycle once."""
    members, cycles, seen = set(group), [], set()
    for start in group:
        paths: dict[str, list[Import]] = {start: []}
        frontier, cycle = [start], None
        while frontier and cycle is None:
            following = []
            for node in frontier:
                for edge in graph[node]:
                    if edge.target == start:
                        cycle = paths[node] + [edge]
                        break
                    if edge.target in members and edge.target not in paths:
                        paths[edge.target] = paths[node] + [edge]
                        following.append(edge.target)
                if cycle is not None:
                    break
            frontier = following
        key = frozenset((e.source, e.target) for e in cycle or [])
        if cycle and key not in seen:
            seen.add(key)
            cycles.append(cycle)
    return cycles


def _where(edge: Import, modules: dict[str, Module]) -> str:
    root = modules[PACKAGE].path.parent.parent
    path = modules[edge.source].path
    shown = os.path.relpath(path, root) if path.is_relative_to(root) else str(path)
    local = ("" if edge.module_level else ", inside a function") + (", under TYPE_CHECKING" if edge.type_only else "")
    names = ", ".join(n for n in edge.names if n)
    return f"{shown}:{edge.line}{local}: {edge.source} -> {edge.target}" + (f" ({names})" if names else "")


def _is_app(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APP)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ================================================================================= tests
def test_the_graph_is_read_from_the_whole_package() -> None:
    """The walk finds the mapped packages and resolves the kinds of imports it must."""
    modules, edges = import_graph()
    for name in ("hf_relattn", "hf_relattn.cli", "hf_relattn.variants.base", "hf_relattn.finetune.train",
                 "hf_relattn.patches.bert", "hf_relattn.model_cards", "hf_relattn.metrics"):
        assert name in modules, f"{name} not found by the walk (found {sorted(modules)})"
    pairs = {(e.source, e.target) for e in edges}
    assert ("hf_relattn.patches", "hf_relattn.patches.bert") in pairs  # from . import bert (a submodule)
    assert ("hf_relattn.patches.bert", "hf_relattn.patches") in pairs  # from . import FamilyAdapter (a name)
    assert ("hf_relattn.finetune.train", "hf_relattn") in pairs  # import hf_relattn
    assert ("hf_relattn.finetune.train", "hf_relattn.finetune.data") in pairs  # from . import data as D
    assert ("hf_relattn.finetune.train", "hf_relattn.finetune.distill") in pairs  # from .distill import ...
    # from . import convert: the package's `convert` is the function its __init__ imported over the submodule
    assert ("hf_relattn.cli", "hf_relattn") in pairs and ("hf_relattn.cli", "hf_relattn.convert") not in pairs
    assert any(e.source == "hf_relattn" and e.target == "hf_relattn.hub" and not e.module_level for e in edges)  # inside push_to_hub


def test_no_import_cycles() -> None:
    modules, edges = import_graph()
    groups = find_cycles(modules, edges)
    report = []
    for cycles in groups:
        members = sorted({e.source for cycle in cycles for e in cycle})
        report.append(f"modules tied together: {', '.join(members)}")
        for cycle in cycles:
            report.append("  " + " -> ".join([cycle[0].source, *(e.target for e in cycle)]))
            report += [f"      {_where(e, modules)}" for e in cycle]
    assert not groups, f"{len(groups)} group(s) of hf_relattn modules import each other in a circle:\n" + "\n".join(report)


def test_the_library_does_not_import_the_app_layer() -> None:
    modules, edges = import_graph()
    bad = [e for e in edges if not _is_app(e.source) and _is_app(e.target)]
    assert not bad, (
        f"library modules import the app layer ({', '.join(APP)}); move what they need into the library:\n"
        + "\n".join(f"    {_where(e, modules)}" for e in bad)
    )


def test_no_private_name_crosses_a_module() -> None:
    modules, edges = import_graph()
    bad = [f"    {_where(e, modules)}" for e in edges
           if e.target != e.source and any(_is_private(n) for n in e.names)]
    # `module._name` read off a module an import bound (`from . import bench` ... `bench._sync`)
    for module in modules.values():
        bound = module_bindings(module, modules)
        for node in ast.walk(module.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr)
                    and bound.get(node.value.id, module.name) != module.name):
                bad.append(f"    {module.path.name}:{node.lineno}: {module.name} reads {bound[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules (make them public where shared, or move them):\n" + "\n".join(bad)


def test_importing_the_package_loads_neither_the_hub_code_nor_finetune() -> None:
    code = ("import hf_relattn, sys; "
            "assert 'hf_relattn.hub' not in sys.modules and 'hf_relattn.finetune' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith('hf_relattn'))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_engine_only_dispatches() -> None:
    """engine.py names no variant (it reads the axes of the contract) and stays small; neither it
    nor the call, the shared paths or the kernels benchmark import a variant's module (the
    benchmark gets its cases from the registry), and the kernels in ops/ import no variant code."""
    from hf_relattn.variants.base import VARIANTS

    modules, edges = import_graph()
    engine = modules["hf_relattn.engine"]
    assert len(engine.path.read_text().splitlines()) <= 400
    names = {node.id for node in ast.walk(engine.tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(engine.tree) if isinstance(node, ast.Attribute)}
    strings = " ".join(node.value for node in ast.walk(engine.tree) if isinstance(node, ast.Constant) and isinstance(node.value, str))
    words = set(strings.replace("`", " ").replace("'", " ").replace('"', " ").split()) | names
    named = sorted(words & (set(VARIANTS) | {cls.__name__ for cls in VARIANTS.values()}))
    assert not named, f"engine.py names variants {named}"
    for source in ("hf_relattn.engine", "hf_relattn.paths", "hf_relattn.call", "hf_relattn.kernels"):
        found = sorted({e.target for e in edges if e.source == source and e.target.startswith("hf_relattn.variants.")
                        and e.target != "hf_relattn.variants.base"})
        assert not found, f"{source} imports variant modules {found}"
    for source in (m for m in modules if m.startswith("hf_relattn.ops")):
        found = sorted({e.target for e in edges if e.source == source and e.target.startswith("hf_relattn.variants")})
        assert not found, f"{source} (shared kernels) imports {found}"
