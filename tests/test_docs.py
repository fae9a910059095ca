"""The repository stands alone: its docs link to files that exist (with the headings they
name), nothing refers to files outside it, and the README stays a front door."""

import re
import subprocess
from pathlib import Path

from .conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return [ROOT / p for p in out if "/results/" not in p]


def _anchors(path: Path) -> set[str]:
    heads = re.findall(r"^#+ (.*)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_markdown_links_resolve():
    bad = []
    for md in _tracked("*.md"):
        for link in LINK.findall(md.read_text()):
            if "://" in link:
                continue
            target, _, anchor = link.partition("#")
            path = (md.parent / target).resolve() if target else md
            if not path.exists():
                bad.append(f"{md.relative_to(ROOT)}: {link}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                bad.append(f"{md.relative_to(ROOT)}: {link} (no such heading)")
    assert not bad, bad


def test_nothing_refers_to_files_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared/docs|shared/vendor")
    hits = [str(p.relative_to(ROOT)) for p in _tracked("*.py", "*.md", "*.sh", "*.yaml", "*.toml")
            if p.name != "test_docs.py" and outside.search(p.read_text())]
    assert not hits, hits


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for part in ("## Quick start", "bash scripts/demo.sh", "bash scripts/test.sh", "## Citing",
                 "@article{", "docs/METHOD.md", "docs/robustness.md"):
        assert part in text, part
