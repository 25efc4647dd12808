"""The package's shape: no import cycles, and nothing outside ``methods/`` branches on a method's name.

Both read the source with ``ast`` (nothing is imported), so they fail on the line that
breaks the rule, whichever test ran first.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tensorscope"


def _method_names() -> set[str]:
    """The ``name`` of every method class defined under tensorscope/methods/ (read, not imported)."""
    names = set()
    for path in (PACKAGE / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and any(getattr(t, "id", None) == "name" for t in stmt.targets)
                            and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)):
                        names.add(stmt.value.value)
    return names


BUILT_IN_METHODS = _method_names()


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports there never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file, functions included."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    base_parts = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base_parts[: len(base_parts) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import tensorscope.x.y` names the deepest known module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_no_import_cycles_counting_imports_inside_functions():
    mods = _modules()
    known = set(mods)
    graph = {n: _imports(n, p, known) for n, p in mods.items()}
    assert graph["tensorscope.plan"], "the import scanner found nothing: it is broken"
    cycles = _cycles(graph)
    detail = "\n".join(" <-> ".join(c) for c in cycles)
    assert not cycles, f"import cycles inside tensorscope (imports in functions count):\n{detail}"


def test_the_method_names_are_read_from_the_methods():
    assert {"svd", "tucker2", "cp", "tt"} <= BUILT_IN_METHODS


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _names_in(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & BUILT_IN_METHODS
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_names_in(e) for e in node.elts)) if node.elts else set()
    return set()


def _method_name_branches(path: pathlib.Path) -> list[str]:
    """Comparisons with a method's name, and hand-kept lists of two or more method names."""
    tree = ast.parse(path.read_text(), str(path))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            if any(_names_in(x) for x in [node.left, *node.comparators]):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_names_in(node)) >= 2:
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            if len(keys & BUILT_IN_METHODS) >= 2:
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: a dict keyed by method names")
    return hits


def test_nothing_outside_methods_branches_on_a_method_name():
    files = [p for p in PACKAGE.rglob("*.py") if "methods" not in p.relative_to(PACKAGE).parts]
    files += list((ROOT / "apps").glob("*.py"))
    hits = [h for p in sorted(files) for h in _method_name_branches(p)]
    assert not hits, "ask the method (tensorscope.methods.Method) instead of comparing its name:\n" + "\n".join(hits)


@pytest.mark.parametrize("src, found", [
    ('if method == "svd": pass', True),
    ('x = m in ("cp", "tt")', True),
    ('COLORS = {"svd": 1, "tucker2": 2}', True),
    ('plan = {"method": "svd", "rank": 3}', False),
    ('"""svd and tucker2 in a docstring"""', False),
])
def test_the_name_scanner_flags_branches_only(tmp_path, src, found):
    f = tmp_path / "m.py"
    f.write_text(src)
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert bool(_method_name_branches(f)) == found
    finally:
        ROOT = old
