"""Every relative link in the README and docs/ points at a file (and heading) that exists.

The README is the front door and the docs link to each other; a moved or renamed page must not
leave a dead link behind. Web links are not checked (no network in CI).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def markdown_pages(root: Path = ROOT) -> list[Path]:
    """The repository's own Markdown pages: top-level ones and everything under docs/."""
    return sorted([*root.glob("*.md"), *(root / "docs").rglob("*.md")])


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks, with inline code spans removed."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, INLINE_CODE.sub("", line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, numbered like GitHub's when a heading repeats."""
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every link or image on ``page`` that is not a web address."""
    links = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if not EXTERNAL.match(target):
                links.append((number, target))
    return links


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """One line per relative link of ``page`` whose file or heading does not exist."""
    problems = []
    for number, target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(root)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def test_every_relative_link_resolves():
    pages = markdown_pages()
    assert ROOT / "README.md" in pages and len(pages) >= 5, pages
    problems = [line for page in pages for line in broken_links(page)]
    assert problems == [], "\n".join(problems)


def test_the_readme_links_to_the_docs_and_the_license():
    targets = {target.partition("#")[0] for _, target in relative_links(ROOT / "README.md")}
    docs = {t for t in targets if t.startswith("docs/") and t.endswith(".md")}
    assert {"docs/design.md", "docs/results-history.md", "LICENSE"} <= targets, targets
    assert len(docs) >= 6, docs


def test_slugs_follow_github():
    assert slug("Full protocol (seed 0, CPU)") == "full-protocol-seed-0-cpu"
    assert slug("`hjepa eval RUN_DIR`") == "hjepa-eval-run_dir"
    assert slug("Loss vs accuracy (`experiments/correlation.py`)") == (
        "loss-vs-accuracy-experimentscorrelationpy"
    )
    assert slug("Hierarchy depth with ceil pooling (CPU, full protocol)") == (
        "hierarchy-depth-with-ceil-pooling-cpu-full-protocol"
    )


def test_the_checker_finds_dead_links_and_ignores_code(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A section\n", encoding="utf-8")
    (tmp_path / "img.png").write_bytes(b"")
    readme = tmp_path / "README.md"
    readme.write_text(
        "\n".join(
            [
                "# Title",
                "[ok](docs/page.md) [ok anchor](docs/page.md#a-section) ![ok](img.png)",
                "[self](#title) [web](https://example.com/missing.md) [mail](mailto:a@b.c)",
                "[gone](docs/missing.md) ![gone](img/missing.png)",
                "[bad anchor](docs/page.md#no-such-section) [bad self](#nowhere)",
                "`[in code](docs/code.md)`",
                "```",
                "[in a fence](docs/fence.md)",
                "```",
            ]
        ),
        encoding="utf-8",
    )
    assert markdown_pages(tmp_path) == [readme, tmp_path / "docs" / "page.md"]
    problems = broken_links(readme, tmp_path)
    assert len(problems) == 4, problems
    assert [p.split(": ", 1)[1].split(":")[0] for p in problems] == [
        "docs/missing.md",
        "img/missing.png",
        "docs/page.md#no-such-section",
        "#nowhere",
    ]
    assert all(p.startswith("README.md:") for p in problems), problems
