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
# forces a variant (qkernels.int8._cupy.kernel_choice). A module global that a test or a
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
