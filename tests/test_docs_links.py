"""Every relative Markdown link of the documentation resolves: README.md, docs/**/*.md and
src/**/README.md. ``[text](path)`` must name an existing file or folder (relative to the page),
``[text](path#anchor)`` a heading of that page, and ``[text](#anchor)`` a heading of the same page,
by GitHub's anchors. Links to http(s)://, mailto: and other schemes are left alone, and so is text
in code blocks and inline code. Dependency-free and fast: no network, no Markdown library."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?\1", re.S)
# [text](target) or ![alt](target), with an optional "title"; the target may be wrapped in <>.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\"|\s+'[^']*')?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, …


def pages() -> list[Path]:
    found = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "src").rglob("README.md"))]
    return [page for page in found if page.is_file()]


def prose(text: str) -> tuple[list[str], str]:
    """The page's ATX heading lines' texts and its prose: fenced code blocks and inline code removed."""
    headings, kept, fence = [], [], None
    for line in text.splitlines():
        opened = FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        heading = HEADING.match(line)
        if heading:
            headings.append(heading.group(2))
        kept.append(line)
    return headings, INLINE_CODE.sub("", "\n".join(kept))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text (no code ticks, link targets or emphasis marks),
    lower-cased, every character but letters, digits, '_', '-' and spaces dropped, spaces → '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis marks, not snake_case
    text = "".join(c for c in text.lower() if c.isalnum() or c in "_- ")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of ``page``: GitHub numbers repeated headings ``-1``, ``-2``, …"""
    seen: dict[str, int] = {}
    found = set()
    for heading in prose(page.read_text(encoding="utf-8"))[0]:
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def broken_links(page: Path) -> list[str]:
    problems = []
    for match in LINK.finditer(prose(page.read_text(encoding="utf-8"))[1]):
        target = match.group(1).strip("<>")
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = match.group(0)
        if not resolved.exists():
            problems.append(f"{where}: no such file {shown(resolved)}")
        elif anchor and resolved.is_file() and resolved.suffix == ".md" and anchor.lower() not in anchors(resolved):
            problems.append(f"{where}: no heading #{anchor} in {shown(resolved)}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_pages_checked_include_the_readme_the_docs_and_the_methods_readme():
    names = {str(page.relative_to(REPO)) for page in pages()}
    assert {"README.md", "docs/outputs.md", "src/simfreeze/method/README.md"} <= names


def test_the_readme_stays_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("heading, anchor", [
    ("Sweeps, the depth oracle and scale-out", "sweeps-the-depth-oracle-and-scale-out"),
    ("Searching the depth with Optuna: `hparams_search=depth`", "searching-the-depth-with-optuna-hparams_searchdepth"),
    ("Freeze policies (`freeze.policy`)", "freeze-policies-freezepolicy"),
    ("`+experiment=staged` — a chain of three stages against scratch",
     "experimentstaged--a-chain-of-three-stages-against-scratch"),
    ("The similarity study: does `round(S · L_total)` pick the right depth?",
     "the-similarity-study-does-rounds--l_total-pick-the-right-depth"),
])
def test_anchors_follow_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_link_and_a_missing_heading_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "other.md").write_text("# Other\n\n## A heading\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#a-heading) [ok](#page) [web](https://example.com) `[code](nowhere.md)`\n"
                    "[gone](missing.md) [no heading](other.md#nope) [no anchor](#nope)\n"
                    "```\n[in a block](nowhere.md)\n```\n")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "missing.md" in problems[0] and "#nope" in problems[1] and "#nope" in problems[2]
