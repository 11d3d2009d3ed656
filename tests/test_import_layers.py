"""The package layers import downward only, in the order docs/architecture.md writes down (read from its
```layers block, so the doc and the check cannot drift apart).

Every import is counted: module level and inside functions (a lazy import is still a dependency). A module of a
layer may import its own layer and any layer below; command-line modules (``*cli*.py``, ``run.py`` of the lab) may
not import another package's command-line module (shared work lives in library functions).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI_MODULES = re.compile(r"(^|\.)(\w*cli\w*|cli)$")


def layer_order() -> list[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    (block,) = re.findall(r"```layers\n(.*?)\n```", text, re.S)
    return [name.strip() for name in block.split("<")]


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of the project (None for third-party modules)."""
    parts = module.split(".")
    if parts[0] == "anima_kernels":
        return "kernels"
    if parts[0] != "anima_ft":
        return None
    return parts[1] if len(parts) > 1 else None  # the top package itself


def project_modules():
    for path in sorted((REPO / "anima_ft").rglob("*.py")):
        yield path, ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for path in sorted((REPO / "kernels").rglob("*.py")):
        rel = path.relative_to(REPO / "kernels").with_suffix("").parts
        yield path, ".".join(("anima_kernels", *rel)).removesuffix(".__init__")


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import statement in the file, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]  # `from pkg import submodule`
    return out


def test_layer_order_names_every_package():
    order = layer_order()
    packages = {layer_of(m) for _, m in project_modules()} - {None}
    assert packages <= set(order), sorted(packages - set(order))
    assert len(order) == len(set(order))


def test_imports_go_downward_only():
    order = {name: i for i, name in enumerate(layer_order())}
    bad = []
    for path, module in project_modules():
        me = layer_of(module)
        for line, target in imports_of(path, module):
            other = layer_of(target)
            if other in order and me in order and order[other] > order[me]:
                bad.append(f"{path.relative_to(REPO)}:{line} ({me}) imports {target} ({other})")
    assert not bad, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(set(bad)))


def test_command_line_modules_do_not_import_each_other():
    bad = []
    for path, module in project_modules():
        for line, target in imports_of(path, module):
            if (target != module and CLI_MODULES.search(target) and layer_of(target)
                    and layer_of(target) != layer_of(module) and not module == "anima_ft.cli"):
                bad.append(f"{path.relative_to(REPO)}:{line} imports the command-line module {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_check_sees_a_planted_upward_import(tmp_path):
    """The checker itself: an upward import in a synthetic module is found (the test can fail)."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from anima_ft.train import trainer\n")
    found = [t for _, t in imports_of(fake, "anima_ft.config.m")]
    assert "anima_ft.train" in found and layer_of("anima_ft.train") == "train"
