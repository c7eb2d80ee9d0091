"""SwAV and DINO through the trainer with 4 crops of 2 sizes (configs/smoke.yaml's sections):
a run killed with SIGKILL resumes bit-exactly (SwAV also with its queue), the saved config
lists the views used, and the crops reach the backbone grouped by size."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from bt_fast import checkpoint, config, methods
from conftest import CONFIGS, REPO

pytestmark = pytest.mark.slow  # trains


def _cmd(dataset, run_dir, method, *extra):
    sets = [f"data.train_dir={dataset / 'train'}", f"train.run_dir={run_dir}", f"method.name={method}",
            "train.checkpoint_every=2", *extra]
    return [sys.executable, "-m", "bt_fast", "train", "--config", str(CONFIGS / "smoke.yaml")] + \
        [a for s in sets for a in ("--set", s)]


def _logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    steps = [json.loads(x)["step"] for x in lines if x.strip() and '"loss"' in x]
    return steps[-1] if steps else 0


# SwAV's queue: 2 batches of 16 per global crop, filled by the steps from index 1 on, in the
# codes from step 3: a checkpoint at step 2 holds it half full, at 4 or 6 full.
QUEUE = ("method.swav.queue_length=32", "method.swav.queue_start_steps=1")


@pytest.mark.parametrize("method,extra", [("swav", ()), ("dino", ()), ("swav", QUEUE)],
                         ids=["swav", "dino", "swav-queue"])
def test_kill_9_then_resume_is_bit_exact(tiny_imagefolder, tmp_path, method, extra):
    """8 steps straight == a run SIGKILLed after its step-2 checkpoint, then resumed to 8.

    Both runs share the schedule (smoke.yaml: 10 epochs of 4 steps); only max_steps differs.
    DINO's teacher, centre and warmed-up temperature, SwAV's frozen-then-free prototypes
    and its queue must all come back from the checkpoint exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(tiny_imagefolder, straight, method, "train.max_steps=8", *extra), check=True, cwd=REPO,
                   env=env, capture_output=True)
    victim = subprocess.Popen(_cmd(tiny_imagefolder, killed, method, "train.max_steps=40", *extra), cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _logged_step(killed) < 3 and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    at = checkpoint.load(killed / "checkpoints" / "last.pt")["step"]
    assert 2 <= at < 8, at  # killed between a checkpoint and the end
    subprocess.run(_cmd(tiny_imagefolder, killed, method, "train.max_steps=8", *extra), check=True, cwd=REPO,
                   env=env, capture_output=True)
    a = checkpoint.load(straight / "checkpoints" / "last.pt")
    b = checkpoint.load(killed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    assert list(a["model"]) == list(b["model"])
    for key, value in a["model"].items():  # weights, BN statistics, teacher, centre, prototypes
        assert torch.equal(value, b["model"][key]), key
    if extra:  # the queue: per rank, full, the same in both runs
        (qa,), (qb,) = a["method_state"], b["method_state"]
        assert int(qa["rows"]) == 32 and qa["queue"].shape == (2, 32, 32) and qa["queue"].abs().sum() > 0
        assert torch.equal(qa["queue"], qb["queue"]) and torch.equal(qa["rows"], qb["rows"])
    else:
        assert "method_state" not in a
    other = {"swav": "dino", "dino": "swav"}[method]  # resuming it as the other method: one line, exit 2
    out = subprocess.run(_cmd(tiny_imagefolder, killed, other, "train.max_steps=9"), cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"trained with method.name='{method}'" in out.stderr, out.stderr[-500:]
    # the saved config lists the crops the run used: 2 global at 32 px, 2 local at 16 px
    saved = yaml.safe_load((killed / "config.yaml").read_text())
    sizes = [v["size"] for v in saved["views"] for _ in range(v["count"])]
    assert sizes == [32, 32, 16, 16] and saved["method"][method]["views"] == []
    assert config.from_dict(saved).views == config.load(CONFIGS / "smoke.yaml", [f"method.name={method}"]).views


def test_crops_reach_the_backbone_grouped_by_size():
    """One backbone pass per run of same-size crops, channels-last kept, features in crop order."""
    cfg = config.load(CONFIGS / "smoke.yaml", ["method.name=swav"])
    torch.manual_seed(0)
    model = methods.build(cfg).to(memory_format=torch.channels_last).eval()
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(3, 3, s, s, generator=g).contiguous(memory_format=torch.channels_last)
             for s in (32, 32, 16, 16, 16)]
    seen = []
    model.backbone.register_forward_pre_hook(
        lambda m, args: seen.append((tuple(args[0].shape), args[0].is_contiguous(memory_format=torch.channels_last))))
    feats = model.encode(views)
    assert seen == [((6, 3, 32, 32), True), ((9, 3, 16, 16), True)]
    one_by_one = torch.cat([model.backbone(v) for v in views])  # eval mode: BN batch-independent
    torch.testing.assert_close(feats, one_by_one, rtol=1e-5, atol=1e-5)
