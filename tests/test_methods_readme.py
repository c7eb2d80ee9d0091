"""README, "Add a method in one file": the SimSiam example, registered as the README says,
trains through the unchanged trainer and lands in a checkpoint eval can read."""

import json
import subprocess
import sys

import pytest
import torch

from bt_fast import checkpoint
from conftest import CONFIGS, REPO

pytestmark = pytest.mark.slow  # trains

# A fresh interpreter: the method file is imported and registered before bt_fast.config
# builds its method sections, exactly as a new file plus one METHODS line would be.
RUN = """
import json, sys, types
from bt_fast import methods
module = types.ModuleType("bt_fast.methods.simsiam")
exec(compile(sys.argv[1], "simsiam.py", "exec"), module.__dict__)
sys.modules[module.__name__] = module
methods.METHODS["simsiam"] = module.SimSiam
from bt_fast.cli import main
sys.exit(main(json.loads(sys.argv[2])))
"""


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Add a method in one file"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]


def test_readme_method_trains_through_the_trainer(tiny_imagefolder, tmp_path):
    code = readme_example()
    assert "class SimSiam(Method)" in code and '"simsiam": SimSiam' in (REPO / "README.md").read_text()
    sets = ["method.name=simsiam", "method.simsiam.projector=32-32", "method.simsiam.predictor=16-32",
            "train.max_steps=2", f"data.train_dir={tiny_imagefolder / 'train'}",
            f"data.val_dir={tiny_imagefolder / 'val'}", f"train.run_dir={tmp_path}"]
    argv = ["train", "--config", str(CONFIGS / "smoke.yaml"), *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run([sys.executable, "-c", RUN, code, json.dumps(argv)], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["method"]["simsiam"]["predictor"] == "16-32"
    assert {k.split(".")[0] for k in ckpt["model"]} == {"backbone", "projector", "predictor"}
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert len(losses) == 2 and all(-1 <= v <= 1 for v in losses)  # SimSiam's D lies in [-1, 1]
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())
