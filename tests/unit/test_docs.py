"""The docs stay inside the repository: every link resolves to a file here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page: Path) -> None:
    text = page.read_text()
    outside = re.findall(r"https?://\S+", text)
    assert not outside, f"{page.name} links outside the repository: {outside}"
    for target in LINK.findall(text):
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"


def test_the_pages_the_readme_names_exist() -> None:
    for name in ("architecture", "deployment", "security-tests", "benchmarks"):
        assert (ROOT / "docs" / f"{name}.md").exists()
    assert "ARCHITECTURE.md" not in (ROOT / "SECURITY.md").read_text()
