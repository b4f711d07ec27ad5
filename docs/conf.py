"""Sphinx configuration: MyST reads the Markdown pages, autodoc + napoleon read the package's docstrings.

Build (warnings are errors, as in CI): ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
The API reference is generated on every build by autosummary, recursively over the ``bitfit_peft`` package, so
renamed or split modules are picked up without editing these docs.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from sphinx.application import Sphinx

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Document the package of this checkout, also when it is not installed (editable or not).
sys.path.insert(0, str(ROOT))
# Importing the package must never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bitfit_peft  # noqa: E402

project = "bitfit-peft"
author = "bitfit-peft contributors"
copyright = "bitfit-peft contributors"
release = bitfit_peft.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: GitHub-style Markdown as the pages are written; headings get anchors for `page.md#heading` links.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
# results.md embeds the tables that examples/glue/report.py writes with `####` headings under `##` sections: a style
# choice of the generated file, not a broken page, so the heading-level check is the one MyST check left off.
suppress_warnings = ["myst.header"]

# API reference: one page per module, generated at build time (docs/api/generated/ is not committed).
autosummary_generate = True
autosummary_imported_members = False  # the package re-exports its API: document each object once, where it lives
# `ignore-module-all`: the package's `__all__` lists re-exported names; documenting them there too would make every
# cross-reference ambiguous (bitfit_peft.BitFitConfig vs bitfit_peft.config.BitFitConfig).
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
    "ignore-module-all": True,
}
# Optional extras the site documents but does not need: autodoc imports `bitfit_peft.serving.ray_app` against a
# stand-in `ray`, so `pip install -e ".[docs]"` builds the whole site without Ray (a 240 MB install). Always mocked,
# also where Ray is installed, so the site is the same on every machine.
autodoc_mock_imports = ["ray"]
autodoc_inherit_docstrings = False  # no nn.Module boilerplate ("Define the computation...") on our methods
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # types join the `Args:` entries; no lists of bare types
# The docstrings write `name` for code (Hugging Face style): render it as a Python cross-reference, which links
# when the name is documented and falls back to code formatting otherwise.
default_role = "py:obj"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"bitfit-peft {release}"


# Pages link repository files outside docs/ by their relative path (../benchmarks/.../report.md), so the links work
# when the Markdown is read in the repository. On the site, such a file is a page of its own: docs/<same path>
# includes it (docs/examples/glue/README.md includes examples/glue/README.md). Point those links at that page.
_MD_LINK = re.compile(r"\]\((?P<target>\.\./[^)\s#]+\.md)(?P<anchor>#[^)\s]*)?\)")


def _link_to_included_page(app: Sphinx, docname: str, source: list[str]) -> None:
    page_dir = (DOCS / docname).parent

    def retarget(match: re.Match[str]) -> str:
        target = (page_dir / match["target"]).resolve()
        if DOCS in target.parents or ROOT not in target.parents:
            return match[0]
        mirror = DOCS / target.relative_to(ROOT)
        if not mirror.is_file():
            return match[0]  # left as it is: the build then reports the broken link
        return f"]({os.path.relpath(mirror, page_dir)}{match['anchor'] or ''})"

    source[0] = _MD_LINK.sub(retarget, source[0])


# Docstring examples may sit in Markdown fences (```py ... ```), as Hugging Face's doc builder expects; in
# reStructuredText those fence lines would show as stray backticks, and napoleon already renders `>>>` lines as
# code. Drop the fence lines from the docstring as Sphinx sees it (the source is untouched).
_FENCE = re.compile(r"^\s*```[A-Za-z]*\s*$")


def _drop_markdown_fences(app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]) -> None:
    lines[:] = [line for line in lines if not _FENCE.match(line)]


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-docstring", _drop_markdown_fences)
    app.connect("source-read", _link_to_included_page)
