"""model.readout: which pooled stage features the probes read."""

import pytest
import torch
import torch.nn.functional as F

from bt_fast import config
from bt_fast.backbone import build_backbone
from bt_fast.errors import ConfigError
from bt_fast.eval.readout import with_readout


def small_net():
    cfg = config.load(None, ["model.backbone=resnet18", "model.width=8", "model.small_stem=true"])
    torch.manual_seed(0)
    net, dim = build_backbone(cfg.model)
    return net.eval(), dim


def test_default_readout_is_the_backbone_itself():
    net, dim = small_net()
    module, d = with_readout(net, dim, "layer4:1")
    assert module is net and d == dim == 64


def test_grid_readout_against_hooked_stage_outputs():
    net, dim = small_net()
    maps = {}
    for k in (3, 4):
        getattr(net, f"layer{k}").register_forward_hook(lambda m, i, o, k=k: maps.__setitem__(k, o))
    module, d = with_readout(net, dim, "layer3:4,layer4:2")
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        got = module(x)
        net(x)  # fills maps from the plain forward
    # layer3 is 7x7 at 28 px with the small stem: 4x4 adaptive cells overlap; layer4 4x4 -> 2x2
    want = torch.cat([F.adaptive_avg_pool2d(maps[3], 4).flatten(1),
                      maps[4].unflatten(2, (2, 2)).unflatten(4, (2, 2)).mean((3, 5)).flatten(1)], 1)
    assert d == 32 * 16 + 64 * 4 and got.shape == (3, d)
    torch.testing.assert_close(got, want)
    # the 2x2 grid averages back to the global pool the backbone returns
    torch.testing.assert_close(got[:, 512:].view(3, 64, 4).mean(2), net(x))


@pytest.mark.parametrize("bad", ["layer5:1", "layer4", "layer4:0", "fc:1", "layer4:2,"])
def test_bad_readout_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="readout"):
        config.load(None, [f"model.readout={bad}"])


def test_cli_reads_the_config_readout_and_readout_flag_overrides_it(tmp_path, tiny_imagefolder, capsys):
    import json

    from bt_fast.cli import main
    from bt_fast.config import Config, ModelConfig, to_dict
    from bt_fast.methods import build

    cfg = Config()
    cfg.data.train_dir, cfg.data.val_dir = str(tiny_imagefolder / "train"), str(tiny_imagefolder / "val")
    cfg.data.image_size = 32
    cfg.model = ModelConfig(backbone="resnet18", width=8, small_stem=True, readout="layer4:2")
    cfg.method.barlow_twins.projector = "64-64"
    ckpt = tmp_path / "last.pt"
    torch.save({"model": build(cfg).state_dict(), "step": 1, "config": to_dict(cfg)}, ckpt)

    def dim(*extra):
        assert main(["eval", "knn", "--checkpoint", str(ckpt), "--workers", "0", "--json", "--quiet",
                     "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
        return json.loads(capsys.readouterr().out)["feature_dim"]

    assert dim() == 64 * 4  # the checkpoint config's layer4:2
    assert dim("--readout", "layer4:1") == 64  # same cache dir: another readout, other features
    assert dim("--readout", "layer2:4,layer4:1") == 16 * 16 + 64
    assert main(["eval", "knn", "--checkpoint", str(ckpt), "--readout", "layer9:1"]) == 2
