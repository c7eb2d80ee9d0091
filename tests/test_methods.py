"""The method seam: each method's outputs, loss and terms; its config section and views;
BYOL's moving-average target against the formula; what eval reads (``backbone.*``)."""

import math

import pytest
import torch

from bt_fast import config, dist, methods, optim
from bt_fast.errors import ConfigError
from bt_fast.eval.features import load_backbone
from bt_fast.methods.byol import target_tau
from bt_fast.pipelines.spec import expand
from conftest import CONFIGS

TINY = ["model.backbone=resnet18", "model.width=8", "model.small_stem=true",
        "method.barlow_twins.projector=32-16", "method.vicreg.projector=32-16",
        "method.simclr.projector=32-16", "method.byol.projector=32-16", "method.byol.predictor=24-16",
        "method.swav.projector=32-16", "method.swav.n_prototypes=16", "method.dino.head=32-24-8",
        "method.dino.out_dim=16"]
MULTICROP = ("swav", "dino")


def tiny(name: str, *extra: str):
    cfg = config.load(None, TINY + [f"method.name={name}", *extra])
    torch.manual_seed(0)
    return cfg, methods.build(cfg)


def views(n=8, size=16, sizes=None):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, s, s, generator=g) for s in (sizes or [size, size])]


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_forward_loss_and_terms(name):
    _, model = tiny(name)
    outputs = model(views(sizes=[16, 16, 8, 8, 8] if name in MULTICROP else None))
    if name == "dino":  # 5 student crops, 2 teacher (global) crops
        assert [len(o) for o in outputs] == [5, 2]
        assert all(o.shape == (8, 16) for o in outputs[0] + outputs[1])
    else:
        assert all(o.shape == (8, 16) for o in outputs)
        # BYOL: p1, p2 and the target's z1, z2; SwAV: one score tensor per crop
        assert len(outputs) == {"byol": 4, "swav": 5}.get(name, 2)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    loss, terms = model.loss(outputs, None)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert list(terms) == list(type(model).terms)
    assert all(t.shape == () and t.dtype == torch.float32 for t in terms.values())
    loss.backward()
    assert model.backbone.conv1.weight.grad is not None
    detached = [[o.detach() for o in x] for x in outputs] if name == "dino" else [o.detach() for o in outputs]
    if name == "dino":  # the loss moved the centre after using it: the baseline uses the same one
        assert not torch.equal(model.center, buffers["center"])
        model.center.copy_(buffers["center"])
    assert torch.allclose(model.baseline_loss(detached), loss.detach(), rtol=1e-4)


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_state_dict_has_the_backbone_eval_and_export_load(name, tmp_path):
    cfg, model = tiny(name)
    state = model.state_dict()
    for key, value in state.items():  # BYOL's target, DINO's teacher start as a copy: make them differ
        if key.startswith(("target.", "teacher.")) and value.is_floating_point():
            value.add_(1.0)
    torch.save({"model": state, "step": 1, "config": config.to_dict(cfg)}, tmp_path / "last.pt")
    loaded = load_backbone(tmp_path / "last.pt")  # BYOL: the online backbone, not target.backbone
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key
    heads = {k.split(".")[0] for k in state} - {"backbone"}
    assert heads == {"barlow_twins": {"projector"}, "vicreg": {"projector"}, "simclr": {"projector"},
                     "byol": {"projector", "predictor", "target"}, "swav": {"projector", "prototypes"},
                     "dino": {"head", "teacher", "center"}}[name]


def test_every_method_has_a_config_section_with_its_own_defaults():
    cfg = config.load(CONFIGS / "fmnist.yaml", ["method.name=vicreg", "method.vicreg.sim_coeff=10"])
    assert cfg.method.name == "vicreg"
    assert (cfg.method.vicreg.sim_coeff, cfg.method.vicreg.std_coeff, cfg.method.vicreg.cov_coeff) == (10, 25, 1)
    assert cfg.method.barlow_twins.projector == "512-512-512"  # other sections stay as written
    defaults = config.load(None)
    assert defaults.method.simclr.temperature == 0.1 and defaults.method.byol.base_tau == 0.996
    for name, cls in methods.METHODS.items():
        assert isinstance(getattr(defaults.method, name), cls.Config)


def test_views_left_to_the_method_are_its_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  image_size: 40\n")
    simclr = config.load(p, ["method.name=simclr"])
    assert len(simclr.views) == 1 and simclr.views[0].count == 2 and simclr.views[0].brightness == 0.8
    assert [v.size for v in config.resolved_views(simclr)] == [40]
    bt = config.load(p)
    assert [(v.blur_p, v.solarize_p) for v in bt.views] == [(1.0, 0.0), (0.1, 0.2)]
    assert config.load(p, ["method.name=simclr", "views.0.hue=0.0"]).views[0].hue == 0.0
    given = config.load(CONFIGS / "smoke.yaml", ["method.name=simclr"])
    assert given.views == config.load(CONFIGS / "smoke.yaml").views  # the file's views win


@pytest.mark.parametrize("sets, needle", [
    (["method.name=moco"], "name='moco': choose one of barlow_twins, vicreg, simclr, byol"),
    (["method.vicreg.impl=dense"], "method.vicreg: impl='dense'"),
    (["method.simclr.temperature=0"], "method.simclr: temperature=0.0: must be in (0, 100]"),
    (["method.byol.predictor=64-32"], "must end in the projector's size 256"),
    (["method.byol.base_tau=1.5"], "base_tau=1.5"),
    (["method.vicreg.projector=8k"], "expected dash-separated integers"),
    (["method.barlow_twins.lambda=1"], "did you mean 'method.barlow_twins.lambd'"),
])
def test_bad_method_values_are_one_line_config_errors(sets, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        config.load(None, sets)


def test_views_count_is_checked_per_method():
    cfg = config.load(None, ["method.name=vicreg", "views.1.count=2"])
    with pytest.raises(ConfigError, match="VICReg needs exactly 2 views, got 3"):
        config.validate(cfg)
    cfg = config.load(None)
    cfg.method.name = "moco"
    with pytest.raises(ConfigError, match="method.name='moco'"):
        config.validate(cfg)
    for name in MULTICROP:  # global crops first, all one size
        with pytest.raises(ConfigError, match=r"global crops first, all one size.*\[32, 16"):
            config.validate(config.load(None, [f"method.name={name}", "views.0.size=32", "views.0.count=1",
                                               "views.1.size=16", "views.1.count=1"]))


def test_pre_method_keys_in_a_file_say_where_they_went(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("model:\n  projector: 512-512\n")
    with pytest.raises(ConfigError, match="model.projector is now method.barlow_twins.projector"):
        config.load(p)
    p.write_text("loss:\n  lambd: 0.01\n")
    with pytest.raises(ConfigError, match="loss.lambd is now method.barlow_twins.lambd"):
        config.load(p)
    with pytest.raises(ConfigError, match="--set: loss.impl is now method.barlow_twins.impl"):
        config.load(None, ["loss.impl=gram"])


def test_pre_method_config_dicts_still_load():
    old = config.to_dict(config.load(None))
    old.pop("method")
    old["model"]["projector"] = "64-32"
    old["loss"] = {"lambd": 0.01, "eps": 1e-5, "impl": "gram"}
    cfg = config.from_dict(old)
    assert cfg.method.name == "barlow_twins"
    assert (cfg.method.barlow_twins.projector, cfg.method.barlow_twins.lambd,
            cfg.method.barlow_twins.impl) == ("64-32", 0.01, "gram")


def test_target_tau_runs_from_base_to_one_on_a_cosine():
    assert target_tau(0.996, 0, 100) == pytest.approx(0.996)
    assert target_tau(0.996, 50, 100) == pytest.approx(0.998)
    assert target_tau(0.996, 100, 100) == pytest.approx(1.0)


def test_byol_target_follows_the_ema_formula_and_skipped_steps():
    """ξ_{k+1} = τ_k ξ_k + (1 - τ_k) θ_{k+1} on applied steps, ξ unchanged on skipped ones,
    against a float64 recomputation over a few steps with online weights that move."""
    _, model = tiny("byol", "method.byol.base_tau=0.9")
    target, online = model.momentum_pairs()
    assert all(torch.equal(t, o) for t, o in zip(target, online))  # ξ_0 = θ_0
    expected = [t.detach().double().clone() for t in target]
    total = 6
    g = torch.Generator().manual_seed(3)
    for k, applied in enumerate([True, True, False, True]):
        with torch.no_grad():
            for o in online:
                o.add_(torch.randn(o.shape, generator=g) * 0.1)
        model.after_step(k, total, torch.tensor(applied))
        tau = 1 - (1 - 0.9) * (math.cos(math.pi * k / total) + 1) / 2
        if applied:
            expected = [tau * e + (1 - tau) * o.detach().double() for e, o in zip(expected, online)]
    for t, e in zip(target, expected):
        torch.testing.assert_close(t.double(), e, rtol=1e-5, atol=1e-6)
    assert not any(torch.equal(t, o) for t, o in zip(target, online) if t.numel() > 1)


def test_byol_target_is_frozen_and_out_of_the_optimizer_also_after_cpu_sync_bn():
    _, model = tiny("byol")
    model = dist._convert_cpu(model)  # what a distributed CPU run does before the optimizer
    frozen = {id(p) for p in model.target.parameters()}
    assert frozen and not any(p.requires_grad for p in model.target.parameters())
    opt = optim.build(model, config.OptimConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & frozen
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


def test_every_method_views_preset_matches_its_count():
    for name, cls in methods.METHODS.items():
        cfg = config.load(None, [f"method.name={name}"])
        sizes = [v.size for v in expand(config.resolved_views(cfg))]
        assert len(sizes) == cls.n_views or (cls.n_views is None and sizes == [224, 224] + [96] * (len(sizes) - 2)
                                             and len(sizes) >= 8), (name, sizes)
        config.validate(cfg)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = config.load(path)
    config.validate(cfg)
    if path.stem.startswith("imagenet_"):  # the published recipes name their method
        assert cfg.method.name == path.stem.removeprefix("imagenet_")


def test_a_method_sections_views_are_the_runs_views():
    """fmnist.yaml gives SwAV and DINO multi-crop views in their sections: picking the method
    picks them (moved up to ``views``, which --set then edits); other methods keep the file's."""
    swav = config.load(CONFIGS / "fmnist.yaml", ["method.name=swav", "views.1.size=14"])
    assert [v.size for v in expand(swav.views)] == [28, 28] + [14] * 6 and swav.method.swav.views == []
    bt = config.load(CONFIGS / "fmnist.yaml")
    assert [v.size for v in expand(bt.views)] == [28, 28] and len(bt.method.dino.views) == 3
    again = config.from_dict(config.to_dict(swav))  # what a checkpoint's config reads back as
    assert again.views == swav.views
    with pytest.raises(ConfigError, match=r"method\.dino\.views\[1\]: blur_p=2.0"):
        config.load(CONFIGS / "fmnist.yaml", ["method.name=dino", "method.dino.views=[{size: 28}, {blur_p: 2}]"])
    with pytest.raises(ConfigError, match="method.swav.views: expected a list of view mappings"):
        config.load(None, ["method.name=swav", "method.swav.views=5"])
