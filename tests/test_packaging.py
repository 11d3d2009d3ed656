"""The built wheel installs exactly the project's own import packages: ``anima_ft`` and ``anima_kernels``.

A top-level ``kernels`` package would shadow Hugging Face's ``kernels`` (used by diffusers and transformers), so the
repository folder ``kernels/`` is mapped to ``anima_kernels`` in pyproject.toml. That mapping needs an explicit package
list, and this test is what keeps the list complete: every folder with an ``__init__.py`` must reach the wheel.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _package_dirs() -> set[str]:
    """Import names of every package folder in the tree, with kernels/ under its installed name."""
    names = set()
    for root, installed in (("anima_ft", "anima_ft"), ("kernels", "anima_kernels")):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / root).parts
            names.add(".".join((installed, *rel)))
    return names


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy of the sources: an in-tree build/ of an earlier build could add stale modules to the wheel
    src = tmp_path_factory.mktemp("src") / "repo"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                                             "__pycache__", ".whl", ".peer", ".hypothesis"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(out), str(src)], capture_output=True, text=True, cwd=out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("anima_ft-*.whl")
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_wheel_top_level_packages_are_the_projects_own(wheel_names):
    top = {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"anima_ft", "anima_kernels"}, top


def test_wheel_holds_every_package_folder(wheel_names):
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in wheel_names if n.endswith("/__init__.py")}
    assert _package_dirs() <= in_wheel, sorted(_package_dirs() - in_wheel)


def test_kernel_modules_ship_under_the_owned_name(wheel_names):
    for mod in ("reference", "attention", "flash", "adaln", "qk_prologue", "_common"):
        assert f"anima_kernels/{mod}.py" in wheel_names
