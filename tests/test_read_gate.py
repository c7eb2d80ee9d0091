"""Each read gate exists once and every module goes through it: a test that fails when
a module opens an image, parses YAML or hands DALI a file list another way."""

import re

import pytest

from conftest import REPO

SOURCES = sorted(p for d in ("bt_fast", "pipelines", "kernels") for p in (REPO / d).rglob("*.py"))

# pattern -> the one module allowed to use it, and why it is the gate
GATES = {
    r"Image\.open\(": ("pipelines/images.py", "images open under the pixel limit, in DALI's formats"),
    r"torchvision\.io|read_image\(|decode_image\(|decode_jpeg\(": (None, "decode through pipelines/images.py"),
    r"yaml\.(load|safe_load|full_load|unsafe_load|load_all|compose|parse)\(": (None, "YAML goes through yamlconf.load_text"),
    r"yaml\.(Safe|Full|Unsafe|Base)?Loader\b": ("bt_fast/yamlconf.py", "the one bounded, strict YAML loader"),
    r"\bfile_list\s*=|\bfile_root\s*=": (None, "file lists go through pipelines/filelist.read"),
    r"\.rpartition\(\" \"\)": ("pipelines/filelist.py", "one parser of 'path label' lines"),
}


def code_lines(path):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.split("#", 1)[0]
        if stripped.strip() and not stripped.strip().startswith(('"', "'")):
            yield n, stripped


@pytest.mark.parametrize("pattern", GATES)
def test_one_gate_per_kind_of_read(pattern):
    allowed, why = GATES[pattern]
    found = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES for n, line in code_lines(p)
             if re.search(pattern, line) and str(p.relative_to(REPO)) != allowed]
    assert not found, f"{why}; found elsewhere: {found}"


def test_the_gates_are_used():
    """The gates themselves hold the pattern (so the scan above is not vacuous)."""
    for pattern, (allowed, _) in GATES.items():
        if allowed:
            assert any(re.search(pattern, line) for _, line in code_lines(REPO / allowed)), pattern
