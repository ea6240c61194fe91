"""The package's import graph, checked: ``python -m lmforge.devtools.imports``.

Prints every lmforge module with the lmforge modules it imports, floor by floor, then fails (exit
status 1) on any of:

* an import cycle;
* an import from a higher floor (:data:`FLOORS`; within a floor, imports are fine while acyclic);
* ``data/`` and ``model/`` importing each other;
* a function-local import of an lmforge module outside :data:`LAZY_OK` (the CLI imports each
  subcommand's code when it runs, for start-up time; anywhere else a local import would hide a
  dependency, usually one that dodges a cycle).

Imports under ``if TYPE_CHECKING:`` are not run, so they are not edges.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("lmforge", "lmforge.errors", "lmforge.presets", "lmforge.config", "lmforge.options", "lmforge.malloc",
                "lmforge.runtime", "lmforge.hardware", "lmforge.rundir", "lmforge.testhooks", "lmforge._lm_eval_hook",
                "lmforge.devtools")),
    ("data, model, chat", ("lmforge.data", "lmforge.model", "lmforge.chat", "lmforge.examples")),
    ("training, generate, interop, loading, chat_repl", ("lmforge.training", "lmforge.generate", "lmforge.interop",
                                                       "lmforge.generate_seq2seq", "lmforge.loading",
                                                       "lmforge.chat_repl", "lmforge.speculative",
                                                       "lmforge.inference")),
    ("evaluate, compress", ("lmforge.evaluate", "lmforge.compress")),
    ("finetune", ("lmforge.finetuning",)),
    ("serve, sweep, apps", ("lmforge.serve", "lmforge.sweep", "lmforge.apps")),
    ("command line", ("lmforge.cli", "lmforge.__main__")),
]
"""Floors, lowest first: a module imports only from its own floor or below."""
NEVER = [("lmforge.data", "lmforge.model"), ("lmforge.model", "lmforge.data")]
"""(importer, imported) package pairs that must stay apart."""
LAZY_OK = ("lmforge.cli",)
"""Modules whose function-local lmforge imports are there for start-up time."""


@dataclass
class Graph:
    edges: dict[str, set[str]] = field(default_factory=dict)
    """module -> lmforge modules it imports at module level or in functions."""
    local: list[tuple[str, str, int]] = field(default_factory=list)
    """(module, imported, line) of every function-local lmforge import."""


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import node, inside a function?) for every import that runs."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _targets(node: ast.Import | ast.ImportFrom, current: str, modules: set[str]) -> list[str]:
    """The lmforge modules an import statement loads (``from pkg import mod`` names the module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the package ``level`` steps up from this module
            parts = current.split(".")[:-node.level]
            base = ".".join([*parts, base] if base else parts)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return [n for n in dict.fromkeys(names) if n == "lmforge" or n.startswith("lmforge.")]


def build_graph(root: Path) -> Graph:
    """The import graph of the package in folder ``root`` (e.g. .../lmforge)."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(root, p) for p in paths}
    graph = Graph()
    for path in paths:
        name = module_name(root, path)
        graph.edges.setdefault(name, set())
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(node, name, modules):
                if target == name:
                    continue
                graph.edges[name].add(target)
                if in_function:
                    graph.local.append((name, target, node.lineno))
    return graph


def floor_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "lmforge") or module == "lmforge":
            return i
    raise KeyError(f"{module} is on no floor: add it to FLOORS in {__name__}")


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return components


def problems(graph: Graph, check_floors: bool = True) -> list[str]:
    """Every rule the graph breaks, one line each."""
    out = [f"import cycle among: {', '.join(c)}" for c in find_cycles(graph.edges)]
    for src, targets in sorted(graph.edges.items()):
        for dst in sorted(targets):
            if check_floors and floor_of(dst) > floor_of(src):
                out.append(f"{src} (floor {floor_of(src)}) imports {dst} from a higher floor ({floor_of(dst)})")
            for a, b in NEVER:
                if src.startswith(a + ".") and dst.startswith(b + "."):
                    out.append(f"{src} imports {dst}: {a} and {b} never import each other")
    out += [f"{src}:{line} imports {dst} inside a function (only {', '.join(LAZY_OK)} may, for start-up time)"
            for src, dst, line in graph.local if src not in LAZY_OK]
    return out


def format_graph(graph: Graph) -> str:
    lines = []
    for i, (title, _) in enumerate(FLOORS):
        lines.append(f"floor {i}: {title}")
        for name in sorted(m for m in graph.edges if floor_of(m) == i):
            deps = sorted(graph.edges[name])
            lines.append(f"  {name}" + (f" -> {', '.join(d.removeprefix('lmforge.') for d in deps)}" if deps else ""))
    return "\n".join(lines)


def main(root: Path | None = None) -> int:
    root = root or Path(__file__).resolve().parents[1]
    graph = build_graph(root)
    print(format_graph(graph))
    found = problems(graph)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    print(f"{len(graph.edges)} modules, {sum(map(len, graph.edges.values()))} imports, "
          f"{len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
