"""Figures of the package layout of a checkout: modules per folder, the import graph, the largest code.

    python docs/layout.py .                                   # this checkout
    python docs/layout.py . --modules                         # every module, one line each
    git worktree add /tmp/before 7135882 && python docs/layout.py /tmp/before

Modules are the ``.py`` files under ``cliptuner/`` and ``executors/`` (a package's ``__init__.py`` is the package).
An edge ``a -> b`` is an import of ``b`` anywhere in ``a``: absolute or relative, at the top or inside a function.
An import names the most specific module it reaches (``from cliptuner.model import registry`` is
``cliptuner.model.registry``; ``from cliptuner.model.registry import Registry`` too); the parent packages that
Python also runs are not counted as edges. The deepest import chain is the longest path of that graph; modules
that import each other in a cycle are reported and counted as one step of a chain. Lines are the lines of a file;
a function's lines run from its ``def`` to its last line (nested functions are counted inside it, and on their own).
Standard library only (``ast``).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("cliptuner", "executors")


@dataclass
class Module:
    """One module of the checkout."""

    name: str  # dotted name, e.g. cliptuner.model.registry
    path: Path  # relative to the checkout
    is_package: bool  # an __init__.py
    lines: int
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # dotted names of the modules it imports


def find_modules(root: Path) -> dict[str, Module]:
    """Every ``.py`` file under the packages of ``root``, keyed by dotted module name."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            text = path.read_text(encoding="utf-8")
            name = ".".join(parts)
            modules[name] = Module(name, rel, is_package, len(text.splitlines()), ast.parse(text, str(rel)))
    return modules


def _most_specific(name: str, known: dict[str, Module]) -> str | None:
    """The longest prefix of ``name`` that is a known module, or None outside the packages."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _relative_base(module: Module, level: int) -> str:
    """The package a ``from .`` import with ``level`` dots starts from."""
    parts = module.name.split(".")
    if not module.is_package:
        parts = parts[:-1]
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


def resolve_imports(modules: dict[str, Module]) -> None:
    """Fill ``Module.imports`` from every import statement of every module."""
    for module in modules.values():
        for node in ast.walk(module.tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = _relative_base(module, node.level)
                    base = f"{prefix}.{base}" if base else prefix
                targets = [f"{base}.{alias.name}" for alias in node.names] if base else []
            for target in targets:
                resolved = _most_specific(target, modules)
                if resolved and resolved != module.name:
                    module.imports.add(resolved)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (a module graph can be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def deepest_chain(graph: dict[str, set[str]], components: list[list[str]]) -> list[str]:
    """The longest import chain, a cycle counted as one step (named by its first member)."""
    owner = {member: i for i, component in enumerate(components) for member in component}
    dag: dict[int, set[int]] = {i: set() for i in range(len(components))}
    for node, targets in graph.items():
        for target in targets:
            if owner[node] != owner[target]:
                dag[owner[node]].add(owner[target])
    best: dict[int, list[int]] = {}

    # Tarjan emits components in reverse topological order: every import of a component comes before it.
    def rank(chain: list[int]) -> tuple[int, list[str]]:  # longest first; among equals, the first by name
        return -len(chain), [components[j][0] for j in chain]

    for i in range(len(components)):
        best[i] = [i] + min((best[j] for j in dag[i]), key=rank, default=[])
    longest = min(best.values(), key=rank, default=[])
    return ["{" + ", ".join(components[i]) + "}" if len(components[i]) > 1 else components[i][0] for i in longest]


def largest_function(modules: dict[str, Module]) -> tuple[int, str]:
    """The longest function or method: (lines, 'path:line name')."""
    best = (0, "")
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > best[0]:
                    best = (lines, f"{module.path}:{node.lineno} {node.name}")
    return best


def figures(root: Path) -> dict:
    """Every figure this script prints, for the checkout at ``root``."""
    modules = find_modules(root)
    resolve_imports(modules)
    graph = {name: module.imports for name, module in modules.items()}
    components = strongly_connected(graph)
    cycles = [c for c in components if len(c) > 1]
    chain = deepest_chain(graph, components)
    largest = max(modules.values(), key=lambda m: m.lines)
    function_lines, function_where = largest_function(modules)
    return {
        "modules": len(modules),
        "modules_per_folder": dict(sorted(Counter(str(m.path.parent) for m in modules.values()).items())),
        "imports": sum(len(targets) for targets in graph.values()),
        "cycles": cycles,
        "deepest_chain_modules": len(chain),
        "deepest_chain": chain,
        "largest_module": {"path": str(largest.path), "lines": largest.lines},
        "largest_function": {"where": function_where, "lines": function_lines},
    }


def main(argv: list[str] | None = None) -> None:
    """Print the figures of a checkout (text, or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="the root of a cliptuner checkout")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--modules", action="store_true", help="list every module with its docstring's first line")
    args = parser.parse_args(argv)
    if not (args.checkout / "cliptuner").is_dir():
        parser.error(f"{args.checkout} has no cliptuner/ folder; give the root of a checkout")
    if args.modules:
        for module in find_modules(args.checkout).values():
            docstring = (ast.get_docstring(module.tree) or "").split("\n")[0]
            print(f"{module.path} ({module.lines}): {docstring}")
        return
    result = figures(args.checkout)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"modules: {result['modules']} ({result['imports']} imports between them)")
    for folder, count in result["modules_per_folder"].items():
        print(f"  {folder + '/':<28} {count}")
    chain = result["deepest_chain"]
    print(f"deepest import chain: {len(chain)} modules")
    print("  " + " -> ".join(chain))
    print(f"cycles: {len(result['cycles'])}")
    for cycle in result["cycles"]:
        print("  " + " <-> ".join(cycle))
    print(f"largest module: {result['largest_module']['path']} ({result['largest_module']['lines']} lines)")
    print(f"largest function: {result['largest_function']['where']} ({result['largest_function']['lines']} lines)")


if __name__ == "__main__":
    sys.exit(main())
