"""Config: defaults < YAML < --set, strict keys and types, YAML's traps, exit code 2."""

import re

import pytest

from bt_fast import config
from bt_fast.cli import main


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_set(tmp_path):
    p = write(tmp_path, "optim:\n  lr_weights: 0.3\n  lr_biases: 0.01\n")
    cfg = config.load(p, ["optim.lr_biases=0.02", "views.1.blur_p=0.5"])
    assert cfg.optim.lr_weights == 0.3          # YAML beats default
    assert cfg.optim.lr_biases == 0.02          # --set beats YAML
    assert cfg.optim.momentum == 0.9            # default kept
    assert cfg.views[1].blur_p == 0.5 and cfg.views[0].blur_p == 1.0


def test_scientific_notation_without_dot_becomes_float(tmp_path):
    p = write(tmp_path, "optim:\n  weight_decay: 1e-3\n")
    assert yaml_reads_string("1e-3")  # the trap this guards against
    assert config.load(p).optim.weight_decay == pytest.approx(1e-3)


def yaml_reads_string(text):
    import yaml
    return isinstance(yaml.safe_load(text), str)


@pytest.mark.parametrize("text, needle", [
    ("optim:\n  lr_wieghts: 0.1\n", "did you mean 'optim.lr_weights'"),
    ("optim:\n  epochs: many\n", "optim.epochs: expected float"),
    ("train:\n  max_steps: 1.5\n", "train.max_steps: expected int"),
    ("train:\n  channels_last: 1\n", "train.channels_last: expected bool"),
    ("optim:\n  epochs: 1\n  epochs: 2\n", "duplicate key 'epochs'"),
    ("method:\n  barlow_twins:\n    projector: [1, 2]\n", "method.barlow_twins.projector: expected str"),
    ("views:\n  - {flip_p: 2.0}\n", "views[0]: flip_p=2.0: must be in [0, 1]"),
    ("bogus:\n  x: 1\n", "unknown key 'bogus'"),
])
def test_bad_config_names_file_and_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_unknown_key_lists_valid_keys(tmp_path):
    p = write(tmp_path, "data:\n  batchsize: 3\n")
    msg = str(pytest.raises(config.ConfigError, config.load, p).value)
    assert "batch_size" in msg and "valid keys" in msg


def test_bad_override_is_a_config_error(tmp_path):
    with pytest.raises(config.ConfigError, match="train.seeed"):
        config.load(None, ["train.seeed=3"])


def test_saved_config_round_trips(tmp_path):
    cfg = config.load(None, ["model.backbone=resnet18", "views.0.scale=[0.2, 1.0]"])
    config.save(cfg, tmp_path / "config.yaml")
    again = config.load(tmp_path / "config.yaml")
    assert again == cfg


def test_cli_exit_code_2_with_one_line(tmp_path, capsys):
    p = write(tmp_path, "optim:\n  lr_wieghts: 0.1\n")
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr_wieghts" in err[0] and str(p) in err[0]


def test_view_size_0_takes_data_image_size():
    cfg = config.load(None, ["data.image_size=40", "views.0.size=224", "views.1.size=0"])
    assert [v.size for v in config.resolved_views(cfg)] == [224, 40]


@pytest.mark.parametrize("sets, needle", [
    (["train=5", "train.seed=1"], "train.seed does not name a config value"),
    (["views.9.size=1"], "views.9.size does not name a config value"),
])
def test_bad_override_paths_are_config_errors(sets, needle):
    with pytest.raises(config.ConfigError, match=needle):
        config.load(None, sets)


@pytest.mark.parametrize("item, needle", [
    ("train.log_every=0", "train.log_every=0: must be in [1, "),
    ("data.batch_size=0", "data.batch_size=0: must be in [1, "),
    ("train.checkpoint_every=-1", "train.checkpoint_every=-1: must be in [0, "),
    ("dist.grad_compression=fp8", "dist.grad_compression='fp8'"),
    ("method.barlow_twins.impl=fast", "impl='fast'"),
])
def test_trainer_rejects_meaningless_values(item, needle):
    with pytest.raises(config.ConfigError, match=re.escape(needle)):
        config.validate(config.load(None, [item]))
