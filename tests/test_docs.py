"""The documentation works: every `>>>` example in the package runs as written, and the Sphinx site builds with
warnings as errors.

Modules are discovered with `pkgutil.walk_packages`, so a module that is added, split or renamed is covered without
editing this file.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import io
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitfit_peft

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# What the docstrings may rely on: `...` for elided output, and line-wrapped output (long reprs) still matching.
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def package_modules() -> list[str]:
    """Every module of the `bitfit_peft` package, the package itself included."""
    found = pkgutil.walk_packages(bitfit_peft.__path__, prefix=f"{bitfit_peft.__name__}.")
    return [bitfit_peft.__name__, *sorted(info.name for info in found)]


# Modules that need an optional extra (`pip install -e ".[ray]"`); CI installs every extra, so CI runs them all.
OPTIONAL = {"bitfit_peft.serving.ray_app": "ray"}


def _import_optional(name: str) -> object | None:
    """Import a module; None for a module whose optional extra is not installed (skipped outside CI)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            return None
        raise


def package_doctests() -> list[doctest.DocTest]:
    """The `>>>` examples of every module, one DocTest per docstring that has any (objects defined elsewhere and
    only imported into a module are found once, in the module that defines them)."""
    finder = doctest.DocTestFinder()
    found = [test for module in map(_import_optional, package_modules()) if module for test in finder.find(module)]
    tests = [test for test in found if test.examples]
    return sorted(tests, key=lambda test: test.name)


DOCTESTS = package_doctests()


def test_the_package_has_doctests_to_run() -> None:
    # Guards the discovery itself: an empty list would make the parametrized test below vanish, not fail.
    assert len(package_modules()) > 1, package_modules()
    assert DOCTESTS, f"no >>> example found in {package_modules()}"


@pytest.mark.parametrize("test", DOCTESTS, ids=[test.name for test in DOCTESTS])
def test_docstring_example_runs_as_written(test: doctest.DocTest) -> None:
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    torch.manual_seed(0)  # examples that draw random tensors print the same values on every run
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = runner.run(test, out=report.write, clear_globs=True)
    finally:
        torch.set_num_threads(before)
    assert result.failed == 0, f"{test.name} ({test.filename}:{test.lineno}):\n{report.getvalue()}"


# Sphinx as `pip install -e ".[docs]"` leaves it on a fresh machine: the optional extras' packages (OPTIONAL) are not
# installed there, so they are hidden here even where they are (sys.argv[1]: the names, comma-separated).
SPHINX_WITHOUT_OPTIONAL = """
import importlib.machinery, sys
from sphinx.cmd.build import main
hidden, find = set(sys.argv[1].split(",")), importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):
    return None if name.split(".")[0] in hidden else find(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
sys.exit(main(sys.argv[2:]))
"""


def test_sphinx_site_builds_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("sphinx", reason="install the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("myst_parser", reason="install the docs extra: pip install -e '.[docs]'")
    out = tmp_path / "html"
    # A separate process: Sphinx imports the package from the checkout and changes global state (sys.path, logging).
    build = subprocess.run(
        [sys.executable, "-c", SPHINX_WITHOUT_OPTIONAL, ",".join(sorted(set(OPTIONAL.values())))]
        + ["-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]
    assert (out / "index.html").is_file()
    assert (out / "api" / "generated" / "bitfit_peft.html").is_file()
    # Every module of the package has its API page, those of optional extras included (their imports mocked).
    for name in package_modules():
        assert (out / "api" / "generated" / f"{name}.html").is_file(), name
    # Every figure in docs/figures is on the site, not a broken <img>.
    for figure in sorted((DOCS / "figures").glob("*.png")):
        assert (out / "_images" / figure.name).is_file(), figure.name
