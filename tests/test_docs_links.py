"""The documentation holds together: every relative link in README.md and docs/**/*.md names a file
or directory that exists (and, into a Markdown file, a heading that exists), and the README stays a
short front page (issue 37)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
# [text](target) or [text](target "title"), images too; text may hold one level of [brackets]
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    """The link targets outside code (fenced blocks and `spans`), minus external and #anchor ones."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = []
    for match in LINK.finditer(prose):
        target = match.group(1).strip("<>")
        if target and not target.startswith("#") and not EXTERNAL.match(target):
            targets.append(target)
    return targets


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(path: Path) -> list[str]:
    """Each relative link whose file or directory is missing, or whose #anchor names no heading of
    the Markdown file it points to."""
    broken = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        where, _, anchor = unquote(target.split("?", 1)[0]).partition("#")
        file = path.parent / where
        if not file.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{path.relative_to(ROOT)}: {target} (no heading with that anchor)")
    return broken


def test_the_link_finder_sees_what_it_should():
    text = ("[a](x.md) [b](dir/y.md#part) [c](https://e.org) [d](#anchor) [e](mailto:a@b.c)\n"
            "![img](pic.png \"title\") [f [g]](<z w.md>) `[no](code.md)`\n"
            "```\n[no](fenced.md)\n```\n")
    assert relative_links(text) == ["x.md", "dir/y.md#part", "pic.png", "<z w.md>".strip("<>")]


def test_anchors_follow_githubs_heading_ids(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Serving (`bench-serve`)\n## Peers: llama.cpp and vLLM's CPU build\n"
                    "## Notes\n## Notes\n```\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"serving-bench-serve", "peers-llamacpp-and-vllms-cpu-build", "notes",
                             "notes-1"}


def test_every_relative_link_resolves():
    files = markdown_files()
    assert len(files) > 1
    broken = [link for path in files for link in broken_links(path)]
    assert not broken, f"{len(broken)} broken relative links:\n" + "\n".join(broken)


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}); move detail to docs/")
