"""The README is a first page: its two commands are as promised and its links lead somewhere.

Every relative link of README.md and docs/*.md names a file of the repository (and, with
a ``#fragment``, a heading of it, as GitHub makes anchors); the README's two commands are
the ones the project promises to keep unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+\.md)(#[^)\s]*)?\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_name_existing_pages_and_headings(page):
    for target, fragment in LINK.findall(page.read_text()):
        path = (page.parent / target).resolve()
        assert path.is_file(), f"{page.name} links to {target}, which does not exist"
        if fragment:
            headings = [_anchor(line.lstrip("#")) for line in path.read_text().splitlines()
                        if line.startswith("#")]
            assert fragment[1:] in headings, f"{page.name}: no heading {fragment} in {target}"


def test_the_readme_keeps_its_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt"
            " && python main.py --config configs/unet_synthetic.py --workdir runs/demo"
            in readme)
    assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -r "
            "requirements-dev.txt && pip install --no-deps -r requirements-export.txt && "
            "python -m pytest -q" in readme)
