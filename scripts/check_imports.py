#!/usr/bin/env python3
"""Check the package's layout: no import cycle between its modules, dependencies that point one way between its
stages, and each module's size.

Reads the source only (ast; nothing is imported, so it needs neither torch nor faiss). An edge a -> b is an
import of package module b in module a: `from .b import x`, `from . import b`, `from retrieval.b import x`,
`import retrieval.b`, with relative imports resolved as Python does, subpackages included. By default only the
imports that run when a module is imported count (module and class bodies, top-level if/try blocks), not those
under `if TYPE_CHECKING:`. --deferred adds the imports inside functions: a dependency deferred for speed is
still a dependency, and a cycle hidden that way works only as long as nobody moves the import.

The stages are the package's subpackages, in LAYERS order from the bottom up (--layers for another package): a
stage may import the ones below it and the top-level modules (errors, atomic, ...), which import no stage.

Prints every module with its line count (those over --max-lines flagged), then each cycle as a path and each
import that points up a layer. Exit status 1 if there is either; a module over --max-lines fails only with
--strict-size.

    python scripts/check_imports.py [--deferred] [--strict-size] [--max-lines 400] [--layers a,b,...] [PACKAGE_DIR]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400
# retrieval's stages from the bottom up; see DESIGN.md. evaluation is numpy, models know nothing of FAISS, the index
# calls a model only through the Encoder interface, and only the command line and the server sit on top.
LAYERS = ("data", "evaluation", "models", "train", "index", "scale", "jobs", "server", "cli")


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package (a package is its __init__.py)."""
    name = package_dir.name
    modules = {}
    for file in sorted(package_dir.rglob("*.py")):
        parts = [name, *file.relative_to(package_dir).with_suffix("").parts]
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def imported_names(tree: ast.Module, deferred: bool) -> list[tuple[int, str | None, list[str], int]]:
    """(level, module, names, line) of each import statement that counts (see the module docstring)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not deferred:
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:  # the else branch runs
                    visit_statement(sub)
                continue
            visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((0, alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, [alias.name for alias in node.names], node.lineno))
        visit(node)

    visit(tree)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def resolve(
    module: str, is_package: bool, level: int, target: str | None, names: list[str], modules: dict[str, Path]
) -> set[str]:
    """The package modules one import statement in `module` reaches."""
    if level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if level > 1:
            base = base[: len(base) - (level - 1)]
        absolute = ".".join(base + ([target] if target else []))
    else:
        absolute = target or ""
    reached = set()
    if target is None or names:  # from X import a, b: a and b may be submodules of X
        for name in names:
            if f"{absolute}.{name}" in modules:
                reached.add(f"{absolute}.{name}")
    if absolute in modules and (target is not None or not reached):
        reached.add(absolute)
    if not reached and not level:  # import retrieval.a.b where only retrieval.a is a module: no such case yet
        parts = absolute.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            reached.add(".".join(parts))
    return reached


def import_graph(modules: dict[str, Path], deferred: bool) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}. Only the package's own modules."""
    package = next(iter(modules)).split(".")[0] if modules else ""
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
        for level, target, names, line in imported_names(tree, deferred):
            if not level and not (target or "").split(".")[0] == package:
                continue
            for reached in resolve(module, file.name == "__init__.py", level, target, names, modules):
                if reached != module:
                    graph[module].setdefault(reached, line)
    return graph


def layer_of(module: str, file: Path, package_dir: Path) -> str | None:
    """The stage a module belongs to: its top folder under the package; None for a top-level module."""
    parts = file.relative_to(package_dir).parts
    return parts[0] if len(parts) > 1 else None


def layer_violations(
    graph: dict[str, dict[str, int]], modules: dict[str, Path], package_dir: Path, layers: Sequence[str]
) -> list[str]:
    """One line per import that points up: into a later stage, or from a top-level module into any stage. The
    package's __init__ (the public API) may import anything."""
    rank = {name: i for i, name in enumerate(layers)}
    found = []
    for module, imported in graph.items():
        here = layer_of(module, modules[module], package_dir)
        if modules[module] == package_dir / "__init__.py":
            continue
        if here is not None and here not in rank:
            found.append(f"{module} is in stage {here}, which the layer list does not name ({', '.join(layers)})")
            continue
        for target, line in imported.items():
            there = layer_of(target, modules[target], package_dir)
            if there is None or there == here:
                continue
            if here is None or rank.get(there, -1) > rank[here]:
                where = "a top-level module" if here is None else f"stage {here}"
                found.append(f"{module} (line {line}) imports {target}: {where} may not depend on stage {there}")
    return sorted(found)


def cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """(modules, one cycle through the first of them as a path back to it) per strongly connected component of
    more than one module: every module of a component reaches every other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [(c, _path_in(graph, set(c), c[0])) for c in components]


def _path_in(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in component:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", type=Path, default=ROOT / "retrieval")
    parser.add_argument("--deferred", action="store_true", help="count imports inside functions too")
    parser.add_argument("--max-lines", type=int, default=MAX_LINES, help="flag modules longer than this")
    parser.add_argument("--strict-size", action="store_true", help="fail on a module over --max-lines too")
    parser.add_argument(
        "--layers", default=",".join(LAYERS), help="the stages (subpackages), comma-separated, from the bottom up"
    )
    args = parser.parse_args(argv)
    modules = module_files(args.package.resolve())
    if not modules:
        print(f"no Python modules under {args.package}", file=sys.stderr)
        return 2
    base = args.package.resolve().parent
    big = []
    total = 0
    for module, file in sorted(modules.items(), key=lambda m: str(m[1])):
        n = len(file.read_text(encoding="utf-8").splitlines())
        total += n
        flag = f"  over {args.max_lines}" if n > args.max_lines else ""
        if flag:
            big.append(module)
        print(f"{n:6d}  {file.relative_to(base)}{flag}")
    print(f"{total:6d}  total, {len(modules)} modules; {len(big)} over {args.max_lines} lines")
    graph = import_graph(modules, args.deferred)
    found = cycles(graph)
    kind = "imports, deferred ones included" if args.deferred else "module-level imports"
    if not found:
        print(f"no import cycle ({kind})")
    for component, path in found:
        steps = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in pairwise(path))
        print(f"import cycle ({kind}) among {', '.join(component)}: {steps} -> {path[-1]}")
    upward = layer_violations(graph, modules, args.package.resolve(), args.layers.split(","))
    print(f"{len(upward)} imports against the layers ({args.layers.replace(',', ' < ')})")
    for line in upward:
        print(f"  {line}")
    return 1 if found or upward or (args.strict_size and big) else 0


if __name__ == "__main__":
    sys.exit(main())
