"""Comments and docs point at things that exist: README sections by name, no files that
live outside the repository."""

import re

from conftest import REPO

SOURCES = [p for d in ("bt_fast", "kernels", "pipelines", "tests", "configs", "scripts", "docs", "docker")
           for p in (REPO / d).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", "")]
SOURCES += [REPO / "README.md", REPO / "Makefile"]
OUTSIDE = ("DESIGN.md", "FACTS.md", "STYLE.md", "DEVELOPERS.md")


def texts():
    for path in SOURCES:
        if path.name == "test_cross_references.py":
            continue
        try:
            yield path, path.read_text()
        except UnicodeDecodeError:
            continue


def test_no_reference_to_files_outside_the_repository():
    found = [f"{p.relative_to(REPO)}: {name}" for p, t in texts() for name in OUTSIDE if name in t]
    assert not found, found


def test_readme_sections_named_in_references_exist():
    headings = {re.sub(r"[*`#]", "", line).strip().rstrip(".")
                for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("#") or line.startswith("**")}
    refs = {m for _, t in texts() for m in re.findall(r'README,? "([^"]+)"', t)}
    missing = [r for r in refs if not any(h.startswith(r) for h in headings)]
    assert refs and not missing, missing
