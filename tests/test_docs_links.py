"""The user docs link only to things that exist.

* Every relative link in README.md and docs/*.md points to an existing file, and a ``#fragment`` on a Markdown
  target names an anchor in it (an ``<a id="...">`` or a heading, slugged as GitHub does).
* Every ``docs/<page>.md#anchor`` cited in code (anima_ft/, kernels/, launch/, tests/) names an existing anchor.
* Nothing in the docs or the code points at the unshipped ``../shared/anima_spec.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_DIRS = ["anima_ft", "kernels", "launch", "tests"]

_LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
_ID = re.compile(r"<a\s+id=\"([^\"]+)\"")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)
_CODE_CITE = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file defines (explicit ids and heading slugs; fenced code ignored)."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return set(_ID.findall(text)) | {github_slug(h) for h in _HEADING.findall(text)}


def relative_links(path: Path) -> list[str]:
    """The relative link targets of a Markdown file, outside fenced code."""
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in _LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_slug_matches_github_rules():
    assert github_slug("1. The Python API (`#api`)") == "1-the-python-api-api"
    assert github_slug("Data position: exact when `micro_batch_size` is kept") == (
        "data-position-exact-when-micro_batch_size-is-kept")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in relative_links(doc):
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no anchor #{fragment} in {dest.relative_to(REPO)})")
    assert not broken, f"{doc.relative_to(REPO)}: broken links: {broken}"


def _code_files():
    for d in CODE_DIRS:
        yield from (REPO / d).rglob("*.py")
        yield from (REPO / d).rglob("*.sh")


def test_anchors_cited_in_code_exist():
    cache: dict[str, set[str]] = {}
    broken = []
    for f in _code_files():
        if f == Path(__file__).resolve():
            continue
        for page, anchor in _CODE_CITE.findall(f.read_text(encoding="utf-8", errors="replace")):
            page_path = REPO / "docs" / page
            if page not in cache:
                cache[page] = anchors(page_path) if page_path.exists() else set()
            if anchor not in cache[page]:
                broken.append(f"{f.relative_to(REPO)}: docs/{page}#{anchor}")
    assert not broken, f"code cites anchors that do not exist: {broken}"


def test_nothing_points_at_the_unshipped_spec():
    needle = "anima_spec.md"
    hits = [str(p.relative_to(REPO)) for p in [*DOCS, *_code_files()]
            if p != Path(__file__).resolve() and needle in p.read_text(encoding="utf-8", errors="replace")]
    assert not hits, f"{needle} is not part of this repository; cite docs/model.md instead: {hits}"
