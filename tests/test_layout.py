"""The package layout: imports go one way through the layers, with no cycles and no hidden imports.

    models <- method <- eval <- run <- publish <- cli

``python tests/test_layout.py [PACKAGE_DIR]`` prints the module import graph, its cycles and the
imports made inside functions (the evidence for the layout; it also reads an older flat layout).
"""
import ast
import os
import sys
from typing import Dict, List, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ('models', 'method', 'eval', 'run', 'publish', 'cli')
# Imports allowed inside functions: optional extras that must not be needed to import the package.
OPTIONAL = ('wandb', 'torch.utils.tensorboard')


def _module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ''
    base = module.split('.')
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return '.'.join(base + ([node.module] if node.module else []))


def import_graph(root: str) -> Tuple[Dict[str, Set[str]], List[Tuple[str, str, int]]]:
    """(module -> package modules it imports, [(module, imported name, line)] of imports in functions)."""
    pkg = os.path.basename(root)
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith('.py')]
    modules = {_module_name(p, root): p for p in files}
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    inner: List[Tuple[str, str, int]] = []
    for mod, path in modules.items():
        tree = ast.parse(open(path, encoding='utf-8').read())
        top = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, mod, path.endswith('__init__.py'))
                targets = [f'{target}.{a.name}' if f'{target}.{a.name}' in modules else target for a in node.names]
            else:
                continue
            if id(node) not in top and not _in_toplevel_block(tree, node):
                inner += [(mod, targets[0], node.lineno)]
            for t in targets:
                while t and t not in modules and '.' in t:
                    t = t.rsplit('.', 1)[0]
                if t in modules and t != mod and t.split('.')[0] == pkg:
                    graph[mod].add(t)
    return graph, inner


def _in_toplevel_block(tree: ast.Module, node: ast.AST) -> bool:
    """An import under a module-level ``try`` / ``if`` is still a module-level import."""
    for stmt in tree.body:
        if isinstance(stmt, (ast.Try, ast.If)) and any(n is node for n in ast.walk(stmt)):
            return not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                           for n in ast.walk(stmt))
    return False


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    """Layer index of a package module (-1: the package root and ``_version``, below every layer)."""
    parts = module.split('.')
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def _graph():
    return import_graph(os.path.join(REPO, 'stim_timm'))


def test_no_import_cycles():
    graph, _ = _graph()
    assert cycles(graph) == []


def test_imports_go_down_the_layers():
    graph, _ = _graph()
    upward = [(m, t) for m, ts in graph.items() for t in ts
              if m != 'stim_timm' and layer(t) > layer(m)]
    assert upward == [], upward
    assert {layer(m) for m in graph} == set(range(-1, len(LAYERS)))  # every layer exists


def test_no_imports_inside_functions_except_optional_extras():
    _, inner = _graph()
    hidden = [(m, t, line) for m, t, line in inner if not t.startswith(OPTIONAL)]
    assert hidden == [], hidden


def test_benchmarks_use_the_library_not_the_commands():
    """A benchmark imports ``stim_timm`` (the library), never ``stim_timm.cli`` (it may run a command)."""
    found = []
    folder = os.path.join(REPO, 'benchmarks')
    for name in sorted(f for f in os.listdir(folder) if f.endswith('.py')):
        tree = ast.parse(open(os.path.join(folder, name), encoding='utf-8').read())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ''] + [f'{node.module}.{a.name}' for a in node.names]
                     if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [(name, node.lineno, n) for n in names if n == 'stim_timm.cli' or n.startswith('stim_timm.cli.')]
    assert found == [], found


def main(root: str) -> None:
    graph, inner = import_graph(root)
    edges = sum(len(v) for v in graph.values())
    print(f'{len(graph)} modules, {edges} import edges')
    for m in sorted(graph):
        if graph[m]:
            print(f'  {m} -> {", ".join(sorted(graph[m]))}')
    found = cycles(graph)
    print(f'cycles: {len(found)}')
    for c in found:
        print('  ' + ' <-> '.join(c))
    print(f'imports inside functions: {len(inner)}')
    for m, t, line in inner:
        print(f'  {m}:{line} {t}')


if __name__ == '__main__':
    main(os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(REPO, 'stim_timm'))
