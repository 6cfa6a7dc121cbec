"""The package's layers, read from the source: the library never imports the processes, and no module
imports itself back through others (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streamhash", "consumers")
PROCESSES = ("streamhash.services", "consumers")
ENTRY_POINTS = ("streamhash.cli", "streamhash.__main__")  # the command line reaches the processes


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def is_under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_library_never_imports_a_process():
    bad = {(m, d) for m, deps in imports().items() for d in deps
           if not is_under(m, PROCESSES + ENTRY_POINTS) and is_under(d, PROCESSES)}
    assert not bad


def test_no_import_cycle():
    graph = imports()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    # a package's __init__ re-exporting its submodules, which import siblings through it, is not a cycle of design
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not cycles


# The bottom of the library (with the package's own __init__): modules and packages every layer may import, which
# import nothing of the library but each other.
BASE = ("streamhash.errors", "streamhash.codes", "streamhash.hashmap", "streamhash.rwlock", "streamhash.config")
# May read the whole settings (streamhash.config.Settings); the library below them takes plain values or its own
# sub-settings, so that it can be used, and tested, without a settings file.
SETTINGS_READERS = ("streamhash.config", "streamhash.cli", "streamhash.services", "consumers")


def test_the_base_modules_import_only_each_other():
    bad = {(m, d) for m, deps in imports().items() if is_under(m, BASE)
           for d in deps if d != "streamhash" and not is_under(d, BASE)}
    assert not bad


def settings_importers() -> set[str]:
    out = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.ImportFrom) and node.module == "streamhash.config"
                        and any(a.name == "Settings" for a in node.names)):
                    out.add(module_name(path))
    return out


def test_only_the_processes_and_the_cli_take_the_whole_settings():
    assert not {m for m in settings_importers() if not is_under(m, SETTINGS_READERS)}


def test_the_index_and_the_learning_algorithms_never_import_each_other():
    """Siblings over the base: the index (store, search, the learner's feed) and learn/ (the algorithms) meet only in
    the processes; what both need (the id multimap, code packing) sits below them."""
    apart = ("streamhash.index", "streamhash.learn")
    bad = {(m, d) for m, deps in imports().items() for d in deps
           for a, b in (apart, apart[::-1]) if is_under(m, (a,)) and is_under(d, (b,))}
    assert not bad


def test_datasets_are_known_to_data_the_cli_the_eval_and_the_processes_only():
    """The library below them (kafka, index, learn, model) takes images and labels, never a dataset by name."""
    knowers = ("streamhash.data", "streamhash.cli", "streamhash.eval") + PROCESSES + ENTRY_POINTS
    bad = {(m, d) for m, deps in imports().items() for d in deps
           if is_under(d, ("streamhash.data",)) and not is_under(m, knowers)}
    assert not bad
