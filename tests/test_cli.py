"""The command line and the packaging metadata: help texts are plain text (no reST markup,
no word broken across lines), the ``qkernels`` command lives in torch_ops and points to
``python -m benchmarks`` instead of offering ``bench``, ``python -m qkernels`` (doctor only)
imports nothing above qkernels, and pyproject declares what a plain install needs.
(scripts/wheel_check.sh builds and installs the wheel itself: its contents, a fresh
environment, the layers on bf16 / fp16, ``qkernels doctor``.)"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKUP = re.compile(r"``|:(class|func|meth|mod|attr|obj|data|ref):|`[^`\s]+`_")


def _help(capsys, monkeypatch, width, main, argv):
    """What ``main(argv)`` prints for --help at a terminal ``width`` columns wide."""
    monkeypatch.setenv("COLUMNS", str(width))
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's --help
        rc = exc.code
    out = capsys.readouterr()
    assert rc in (0, None), out.err
    return out.out


def _assert_plain(text, words=()):
    assert text.strip()
    assert not MARKUP.search(text), MARKUP.search(text).group(0)
    tokens = set(re.findall(r"[A-Za-z0-9_.]+", text))
    broken = [w for w in words if w not in tokens]
    assert not broken, f"not whole in the help text: {broken}\n{text}"


def _benchmarks_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return pytest.importorskip("benchmarks.run")


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_benchmarks_help_is_plain_text(capsys, monkeypatch, width):
    run = _benchmarks_run(monkeypatch)
    text = _help(capsys, monkeypatch, width, run.main, ["--help"])
    _assert_plain(text, words=list(run.SECTIONS) + ["matplotlib", "bitsandbytes"])
    assert text.startswith("usage: python -m benchmarks")


@pytest.mark.parametrize("width", [60, 80])
@pytest.mark.parametrize("argv, words", [
    (["--help"], ["demo", "doctor", "benchmarks"]),
    (["demo", "--help"], ["pydoc_data.topics", "SwitchBackLinear", "LinearNF4", "matplotlib"]),
    (["doctor", "--help"], ["NumPy", "backends"]),
])
def test_qkernels_command_help_is_plain_text(capsys, monkeypatch, width, argv, words):
    from torch_ops import cli
    text = _help(capsys, monkeypatch, width, cli.main, argv)
    _assert_plain(text, words)
    assert text.startswith(f"usage: qkernels {argv[0] if argv[0] != '--help' else ''}".rstrip())


def test_qkernels_module_help_is_plain_text(capsys, monkeypatch):
    from qkernels.__main__ import main
    for argv in (["--help"], ["doctor", "--help"]):
        _assert_plain(_help(capsys, monkeypatch, 80, main, argv), ["doctor", "torch_ops"])


def test_bench_is_not_a_command(capsys, monkeypatch):
    """The benchmarks are not in the wheel (and sit above torch_ops): the help does not
    offer bench, and asking for it says where the benchmarks are, with exit status 2."""
    from torch_ops import cli
    text = _help(capsys, monkeypatch, 80, cli.main, ["--help"])
    assert not re.search(r"^\s+bench\s", text, re.M)
    assert "python -m benchmarks" in text
    assert cli.main(["bench", "--ops", "blockwise"]) == 2
    err = capsys.readouterr().err
    assert "python -m benchmarks" in err and "source checkout" in err


def test_command_usage_errors_exit_2(capsys):
    from qkernels.__main__ import main as qk_main
    from torch_ops import cli
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert qk_main(["demo"]) == 2                 # demo is torch_ops': said where it is
    assert "qkernels demo" in capsys.readouterr().err
    assert qk_main(["doctor", "--verbose"]) == 2
    with pytest.raises(SystemExit) as exc:       # argparse: unknown option
        cli.main(["doctor", "--verbose"])
    assert exc.value.code == 2


@pytest.mark.parametrize("path, above", [("qkernels/__main__.py", ("torch_ops", "benchmarks")),
                                         ("torch_ops/cli.py", ("benchmarks",))])
def test_command_modules_import_nothing_above_them(path, above):
    tree = ast.parse((ROOT / path).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and not n.level]
    assert not [m for m in names if m.split(".")[0] in above], names


def test_pyproject_declares_a_plain_install():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    core = {re.split(r"[<>=!~\[ ;]", d)[0].lower().replace("-", "_")
            for d in project["dependencies"]}
    assert {"numpy", "numba", "torch", "ml_dtypes", "tqdm"} <= core
    assert project["license"] == "MIT"                      # SPDX expression, not a table
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639
    assert "Typing :: Typed" in project["classifiers"] and project["urls"]
    assert project["scripts"]["qkernels"] == "torch_ops.cli:main"
    setuptools_floor = next(r for r in meta["build-system"]["requires"]
                            if r.startswith("setuptools"))
    assert int(re.search(r">=(\d+)", setuptools_floor).group(1)) >= 77  # PEP 639 support
    data = meta["tool"]["setuptools"]["package-data"]
    for package in ("qkernels", "reference", "torch_ops"):
        assert "py.typed" in data[package] and (ROOT / package / "py.typed").exists()
