"""The package imports one way: no module imports, at any depth (function-level imports included), a module that
imports it back. docs/package.md shows the resulting layers; this test keeps that page true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bitfit_peft"
DOC = ROOT / "docs" / "package.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Package modules that `path` imports anywhere (module level, functions, TYPE_CHECKING blocks)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("bitfit_peft"):
                continue
            for alias in node.names:  # `from . import x` / `from .serving import store` name submodules
                sub = f"{target}.{alias.name}"
                found.add(sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bitfit_peft"}
    return {m for m in found if m != name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def levels(g: dict[str, set[str]]) -> dict[str, int]:
    """0 for modules importing nothing of the package, else 1 + the highest level they import; raises on a cycle."""
    level: dict[str, int] = {}
    visiting: list[str] = []

    def visit(m: str) -> int:
        if m in level:
            return level[m]
        if m in visiting:
            cycle = visiting[visiting.index(m) :] + [m]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        visiting.append(m)
        level[m] = 1 + max((visit(d) for d in g.get(m, ()) if d in g), default=-1)
        visiting.pop()
        return level[m]

    for m in g:
        visit(m)
    return level


def layer_listing() -> str:
    lv = levels(graph())
    rows = {}
    for m, n in sorted(lv.items()):
        rows.setdefault(n, []).append(m.removeprefix("bitfit_peft.") if m != "bitfit_peft" else "bitfit_peft")
    return "\n".join(f"{n}: {', '.join(rows[n])}" for n in sorted(rows))


def test_the_package_imports_one_way() -> None:
    levels(graph())  # raises with the cycle


def test_core_modules_keep_their_order() -> None:
    """The core reads bottom-up like peft's own tuners: constants and tables, the layer, the tuner, registration (the
    config sits below the tuner; it is beside the layer, which does not need it)."""
    lv = levels(graph())
    assert lv["bitfit_peft.config"] < lv["bitfit_peft.model"]
    chain = ["constants", "layer", "router", "loading", "model", "registration"]
    got = [lv[f"bitfit_peft.{m}"] for m in chain]
    assert got == sorted(got) and len(set(got)) == len(got), dict(zip(chain, got, strict=True))
    assert lv["bitfit_peft.registration"] < lv["bitfit_peft"], "registration sits below the package's __init__"


def test_docs_show_the_current_layers() -> None:
    block = re.search(r"```text\n(.*?)```", DOC.read_text(), re.S)
    assert block, f"{DOC} needs a ```text block with the layers"
    expected = layer_listing()
    assert block.group(1).strip() == expected, f"update the layers in {DOC} to:\n{expected}"
