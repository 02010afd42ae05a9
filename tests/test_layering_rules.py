"""Structural rules of the tree (issue 27), checked by reading the source, not by running it.

Each rule is one test function; rules about other parts of the tree go in their own functions.
"""
from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --- kernel choice: no module-level switches in the CuPy launchers ---------------------------
# A launcher picks its kernel in one function of (device, shapes, dtype) with a keyword that
# forces a variant (qkernels.int8._choice.kernel_choice). A module global that a test or a
# benchmark rewrites to steer a launch (``_cupy.USE_SM90 = False``) is shared, process-wide
# state: it leaks between tests, races between threads and is invisible at the call site.

_CUPY_FILES = sorted(ROOT.glob("qkernels/*/_cupy*.py"))
# Directories whose Python files may not write a launcher module's globals.
_WRITERS = ("qkernels", "torch_ops", "tests", "benchmarks", "scripts")


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> tuple[str, ast.Module]:
    text = path.read_text()
    return text, ast.parse(text, str(path))


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _module_level(tree: ast.Module):
    """The statements of the module body, also those inside module-level if / try blocks."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        yield node
        if isinstance(node, ast.If):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody
            for h in node.handlers:
                todo += h.body


def _assigned(node: ast.stmt) -> list[tuple[str, ast.expr | None]]:
    """(name, value) of each plain name a module-level statement assigns."""
    if isinstance(node, ast.Assign):
        return [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
        return [(node.target.id, node.value)]
    return []


def _globals_of(path: Path) -> set[str]:
    """The names a launcher module assigns at module level (its variables, not its defs)."""
    tree = _parse(path)[1]
    return {name for node in _module_level(tree) for name, _ in _assigned(node)}


def _switches_inside(path: Path) -> list[str]:
    """Module-level switches visible in the launcher itself: a name bound to a bool literal
    (a flag that only rewriting the module changes), a name assigned by more than one
    module-level statement, and ``global`` statements (functions rebinding module state)."""
    tree = _parse(path)[1]
    found, seen = [], {}
    for node in _module_level(tree):
        for name, value in _assigned(node):
            if isinstance(value, ast.Constant) and isinstance(value.value, bool):
                found.append(f"{path.name}:{node.lineno}: {name} = {value.value!r} (a boolean switch)")
            if name in seen:
                found.append(f"{path.name}:{node.lineno}: {name} assigned again (first at line {seen[name]})")
            seen.setdefault(name, node.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"{path.name}:{node.lineno}: global {', '.join(node.names)}")
    return found


def _resolve(file: Path, module: str | None, level: int) -> str:
    """The absolute module name of ``from <level dots><module> import ...`` in ``file``."""
    if level == 0:
        return module or ""
    package = _module_name(file).split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _dotted(expr: ast.expr) -> str | None:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value)
        return None if head is None else f"{head}.{expr.attr}"
    return None


def _writes_to(module: str, names: set[str]) -> list[str]:
    """Places in the tree that assign one of ``names`` on the launcher module ``module``:
    ``alias.NAME = ...``, ``setattr(alias, "NAME", ...)``, ``monkeypatch.setattr(alias,
    "NAME", ...)`` or ``monkeypatch.setattr("module.NAME", ...)``, where alias is any name
    that file binds to the module (imports anywhere in the file, relative ones resolved)."""
    found = []
    for top in _WRITERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            text, tree = _parse(path)
            if module.rsplit(".", 1)[-1] not in text:
                continue
            aliases = {module}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    base = _resolve(path, node.module, node.level)
                    aliases |= {a.asname or a.name for a in node.names if f"{base}.{a.name}" == module}
                elif isinstance(node, ast.Import):
                    aliases |= {a.asname for a in node.names if a.name == module and a.asname}
            where = f"{path.relative_to(ROOT)}"
            for node in ast.walk(tree):
                targets = []
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                    targets = [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr in names and _dotted(t.value) in aliases:
                        found.append(f"{where}:{node.lineno}: {_dotted(t)} = ...")
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                fn = _dotted(node.func) or ""
                if fn != "setattr" and not fn.endswith(".setattr"):
                    continue
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    mod, _, name = first.value.rpartition(".")
                    if mod == module and name in names:
                        found.append(f"{where}:{node.lineno}: {fn}({first.value!r}, ...)")
                elif (len(node.args) > 1 and _dotted(first) in aliases
                      and isinstance(node.args[1], ast.Constant) and node.args[1].value in names):
                    found.append(f"{where}:{node.lineno}: {fn}({_dotted(first)}, {node.args[1].value!r}, ...)")
    return found


def _cupy_params():
    return [pytest.param(path, id=str(path.relative_to(ROOT))) for path in _CUPY_FILES]


@pytest.mark.parametrize("path", _cupy_params())
def test_no_kernel_switches_in_cupy_launchers(path):
    """0 module-level kernel switches in ``qkernels/*/_cupy*.py``: none inside the module,
    and no file of the tree writes one of its module globals."""
    found = _switches_inside(path) + _writes_to(_module_name(path), _globals_of(path))
    assert not found, "module-level switches (use the family's kernel-choice keyword):\n" + "\n".join(found)


def test_switch_rule_sees_the_forms_it_forbids(tmp_path, monkeypatch):
    """The rule above on a planted launcher and a planted test that rewrites it."""
    pkg = tmp_path / "qkernels" / "fam"
    pkg.mkdir(parents=True)
    (pkg / "_cupy.py").write_text("USE_FAST = True\nTILE = (1, 2)\nTILE = (2, 2)\n"
                                  "def f():\n    global TILE\n    TILE = 3\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text(
        "def test(monkeypatch):\n"
        "    from qkernels.fam import _cupy as c\n"
        "    import qkernels.fam._cupy\n"
        "    monkeypatch.setattr(c, 'TILE', 0)\n"
        "    c.USE_FAST = False\n"
        "    qkernels.fam._cupy.TILE = 1\n"
        "    monkeypatch.setattr('qkernels.fam._cupy.USE_FAST', 1)\n"
        "    c.f = None\n")  # a function, not a switch: allowed
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = pkg / "_cupy.py"
    inside = _switches_inside(path)
    writes = _writes_to(_module_name(path), _globals_of(path))
    assert len(inside) == 3 and "USE_FAST = True" in inside[0] and "global TILE" in inside[2]
    assert sorted(int(w.split(":")[1]) for w in writes) == [4, 5, 6, 7], writes


# --- layering: reference <- qkernels <- torch_ops, no import cycles ----------------------------
# Every import counts, also one inside a function (a lazy import is still a dependency). A
# submodule importing its own package (``from . import X`` in ``qkernels/fourbit/ops.py``)
# is not a cycle: the package is the submodule's namespace.

_PACKAGES = ("reference", "qkernels", "torch_ops")
_ALLOWED_BELOW = {"reference": (), "qkernels": ("reference",), "torch_ops": ("reference", "qkernels")}
_OURS = (*_PACKAGES, "benchmarks")


def _modules() -> dict:
    """{dotted module name: path} of the three shipped packages."""
    mods = {}
    for pkg in _PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports_of(name: str, path: Path, mods: dict) -> set:
    """The modules of this tree (and benchmarks) that module ``name`` imports anywhere."""
    _, tree = _parse(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                    if node.level else node.module)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in mods)
    return {m for m in found if m and m.split(".")[0] in _OURS}


def test_no_upward_imports():
    """reference imports neither qkernels nor torch_ops; qkernels never imports torch_ops or
    benchmarks; nothing shipped imports benchmarks."""
    mods = _modules()
    bad = [f"{name} imports {dep}" for name, path in mods.items() for dep in sorted(_imports_of(name, path, mods))
           if dep.split(".")[0] != name.split(".")[0]
           and dep.split(".")[0] not in _ALLOWED_BELOW[name.split(".")[0]]]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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


def _import_graph() -> dict:
    mods = _modules()
    return {name: {dep for dep in _imports_of(name, path, mods)
                   if dep in mods and dep != name and not name.startswith(dep + ".")}
            for name, path in mods.items()}


def test_no_import_cycles():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_rule_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# --- no citations of files outside the repository -------------------------------------------

def test_no_citations_of_files_outside_the_repository():
    """Comments cite docs/FORMATS.md, which the repository has; not SPEC.md or DESIGN.md,
    which it does not."""
    found = []
    for top in ("reference", "qkernels", "torch_ops", "tests", "benchmarks", "scripts", "docs"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix not in (".py", ".cu", ".cuh", ".md", ".sh", ".cpp") or not path.is_file():
                continue
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if "SPEC.md" in line or "DESIGN.md" in line or "../shared" in line:
                    if path.name == "test_layering_rules.py":  # the rule itself names them
                        continue
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not found, "citations of files outside the repository:\n" + "\n".join(found)
