"""Runs the code block under "Using the pipeline in your own code" of a markdown file
(default README.md; BT_PIPELINES_DOC points at another file)."""

import os
import re
from pathlib import Path

from bt_fast.data import make_synthetic

HEADING = "Using the pipeline in your own code"
DEFAULT_DOC = Path(__file__).resolve().parents[1] / "README.md"


def extract_block(markdown: str, heading: str = HEADING) -> str:
    """The first ```python block after the heading (any level), before the next heading."""
    m = re.search(rf"^#+\s*{re.escape(heading)}\s*$(.*?)(?=^#+\s|\Z)", markdown, re.M | re.S)
    assert m, f"no heading {heading!r}"
    code = re.search(r"```python\n(.*?)```", m.group(1), re.S)
    assert code, f"no python block under {heading!r}"
    return code.group(1)


def test_reuse_snippet_runs(tmp_path):
    doc = Path(os.environ.get("BT_PIPELINES_DOC", DEFAULT_DOC))
    code = extract_block(doc.read_text())
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 20
    make_synthetic(tmp_path, classes=2, train_per_class=8, val_per_class=1, size=(40, 36))
    scope = {"DATA_ROOT": str(tmp_path / "train")}
    exec(compile(code, str(doc), "exec"), scope)
    assert scope["loss"].ndim == 0 and scope["state"]["epoch"] >= 1
