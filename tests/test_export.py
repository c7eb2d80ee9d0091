"""``bt-fast export``: the backbone loads into a fresh torchvision model (or its bt_fast
rebuild) and gives the checkpoint's features."""

import pytest
import torch
import torchvision
import yaml

from bt_fast.cli import main
from bt_fast.config import Config, ModelConfig, to_dict
from bt_fast.eval.features import load_backbone
from bt_fast.methods import build


def write_checkpoint(path, model_cfg: ModelConfig, projector: str = "16-16"):
    """A checkpoint in the trainer's format with non-trivial BN statistics."""
    cfg = Config()
    cfg.model = model_cfg
    cfg.method.barlow_twins.projector = projector
    torch.manual_seed(7)
    model = build(cfg)
    model.train()
    with torch.no_grad():  # move BN running stats and weights off their init values
        model([torch.randn(4, 3, 32, 32)])
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "step": 3, "config": to_dict(cfg)}, path)


def features(net, x):
    net.eval()
    with torch.no_grad():
        return net(x)


def test_standard_width_loads_into_torchvision(tmp_path, capsys):
    ckpt = tmp_path / "last.pt"
    write_checkpoint(ckpt, ModelConfig(backbone="resnet18"), projector="32-32")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "r18.pt")]) == 0
    assert "r18.pt.yaml" in capsys.readouterr().out
    state = torch.load(tmp_path / "r18.pt", weights_only=True)
    assert not any(k.startswith(("fc.", "backbone.", "module.")) for k in state)
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(state)  # strict: every tensor of torchvision's layout is there
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(features(net, x), features(load_backbone(ckpt).backbone, x))
    notes = yaml.safe_load((tmp_path / "r18.pt.yaml").read_text())
    assert notes["torchvision_layout"] and notes["step"] == 3 and notes["feature_dim"] == 512


def test_narrow_small_stem_rebuilds_from_the_notes(tmp_path):
    ckpt = tmp_path / "last.pt"
    write_checkpoint(ckpt, ModelConfig(backbone="resnet18", width=8, small_stem=True))
    out = tmp_path / "narrow.pt"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    notes = yaml.safe_load((tmp_path / "narrow.pt.yaml").read_text())
    assert not notes["torchvision_layout"]
    scope = {"torch": torch, "torchvision": torchvision}
    exec(notes["rebuild"].replace(repr(out.name), repr(str(out))), scope)  # the documented lines
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(features(scope["net"], x), features(load_backbone(ckpt).backbone, x))


def test_safetensors_format(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    ckpt = tmp_path / "last.pt"
    write_checkpoint(ckpt, ModelConfig(backbone="resnet18", width=8, small_stem=True))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "b.safetensors"), "--format", "safetensors"]) == 0
    state = load_file(str(tmp_path / "b.safetensors"))
    ref = load_backbone(ckpt).backbone.state_dict()
    assert set(state) == {k for k in ref if not k.startswith("fc.")}
    for k, v in state.items():
        assert torch.equal(v, ref[k]), k


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_checkpoint_with_nonfinite_buffers_is_refused(tmp_path, capsys):
    """A poisoned BN running_var gives NaN features: eval and export refuse it, one line."""
    ckpt = tmp_path / "last.pt"
    write_checkpoint(ckpt, ModelConfig(backbone="resnet18", width=8, small_stem=True))
    state = torch.load(ckpt, weights_only=True)
    state["model"]["backbone.bn1.running_var"][0] = float("nan")
    torch.save(state, ckpt)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bn1.running_var" in err and "NaN/inf" in err
    assert main(["eval", "knn", "--checkpoint", str(ckpt)]) == 2
    assert "NaN/inf" in capsys.readouterr().err
