"""The write gate through the real commands, as a careless or hostile user drives them:
links left at outputs, outputs that are the command's inputs, unwritable places, and
read-only run folders. Each is one line and exit 2, and nothing outside changes."""

import hashlib
import os

import pytest
import yaml

from bt_fast import config, run_folder, safeio
from bt_fast.cli import main
from bt_fast.config import ModelConfig
from bt_fast.errors import EXIT_USER, WriteError
from conftest import CONFIGS
from test_export import write_checkpoint


def snapshot(root) -> dict:
    """{relative path: (kind, content hash or link target)} of every entry under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = ("file", hashlib.sha1(f.read()).hexdigest())
            else:
                out[rel] = ("dir", "")
    return out


def one_line_2(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USER and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    return err


@pytest.fixture()
def ckpt(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    write_checkpoint(path, ModelConfig(backbone="resnet18", width=8, small_stem=True))
    return path


def test_export_over_its_own_checkpoint_is_refused_and_the_checkpoint_survives(ckpt, tmp_path, capsys):
    before = snapshot(tmp_path)
    hard = tmp_path / "hard.pt"
    os.link(ckpt, hard)
    before = snapshot(tmp_path)
    for out in (ckpt, tmp_path / "run" / "checkpoints" / ".." / "checkpoints" / "last.pt", hard):
        err = one_line_2(["export", str(ckpt), "--out", str(out)], capsys)
        assert "own inputs" in err
    assert snapshot(tmp_path) == before


def test_export_through_a_link_left_at_the_output_is_refused(ckpt, tmp_path, capsys):
    victim = tmp_path / "elsewhere" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    (tmp_path / "out.pt").symlink_to(victim)
    before = snapshot(tmp_path)
    assert "symbolic link" in one_line_2(["export", str(ckpt), "--out", str(tmp_path / "out.pt")], capsys)
    assert snapshot(tmp_path) == before


def test_export_into_a_place_that_cannot_be_a_folder_is_one_line(ckpt, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")  # works as root too, unlike chmod
    err = one_line_2(["export", str(ckpt), "--out", str(tmp_path / "a-file" / "bb.pt")], capsys)
    assert str(tmp_path / "a-file") in err


def test_a_link_at_the_file_list_stops_data_preparation(tmp_path, capsys):
    victim = tmp_path / "precious.txt"
    victim.write_text("precious")
    out = tmp_path / "data"
    (out / "train").mkdir(parents=True)
    (out / "train" / "filelist.txt").symlink_to(victim)
    err = one_line_2(["data", "synthetic", "--out", str(out), "--per-class", "2"], capsys)
    assert "filelist.txt is a symbolic link" in err and victim.read_text() == "precious"


def test_tune_refuses_an_overlay_over_its_config_before_probing(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text((CONFIGS / "smoke.yaml").read_text())
    before = snapshot(tmp_path)
    err = one_line_2(["tune", "--config", str(cfg), "--out", str(cfg)], capsys)
    assert "own inputs" in err and snapshot(tmp_path) == before


def test_the_run_config_is_kept_when_it_is_the_input_and_refused_when_it_would_change(tmp_path):
    cfg = config.load(CONFIGS / "smoke.yaml")
    path = tmp_path / "config.yaml"
    config.save(cfg, path)
    mtime = path.stat().st_mtime_ns
    run_folder.save_config(cfg, path, inputs=[path])  # resuming from the saved recipe: unchanged
    assert path.stat().st_mtime_ns == mtime
    cfg.train.max_steps = 99  # --set on top of it: the recipe must not be edited
    with pytest.raises(WriteError, match="own inputs"):
        run_folder.save_config(cfg, path, inputs=[path])
    assert yaml.safe_load(path.read_text())["train"]["max_steps"] != 99


def test_eval_and_report_fall_back_to_the_user_cache_for_a_read_only_run(tmp_path, monkeypatch):
    from bt_fast.eval.features import default_cache_dir
    from bt_fast.report import default_out

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert default_cache_dir(run / "checkpoints" / "last.pt") == run / "eval-cache"
    # Where nothing can be created (root ignores chmod; a file in the way stops anyone).
    (run / "eval-cache").rmdir()
    (run / "eval-cache").write_text("in the way")
    (run / "report").write_text("in the way")
    cache = default_cache_dir(run / "checkpoints" / "last.pt")
    assert cache.parent == tmp_path / "cache" / "bt_fast" / "eval-cache" and cache.name.startswith("run-")
    assert default_out(run).parent == tmp_path / "cache" / "bt_fast" / "reports"


@pytest.mark.slow  # starts a real `bt-fast train` (refused before its first step)
@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/prev.pt"])
def test_train_never_writes_through_a_link_in_its_run_folder(tmp_path, tiny_imagefolder, capsys, name):
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    run = tmp_path / "run"
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).symlink_to(victim)
    outside = snapshot(victim.parent)
    argv = ["train", "--config", str(CONFIGS / "smoke.yaml"), "--set", f"data.train_dir={tiny_imagefolder / 'train'}",
            "--set", f"train.run_dir={run}", "--set", "train.max_steps=1"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USER and err.count("\n") == 1 and "Traceback" not in err, err
    assert "symbolic link" in err, err  # refused at start (checkpoint.prepare), before a step
    assert snapshot(victim.parent) == outside


def test_the_gate_temp_name_carries_host_and_pid(tmp_path):
    assert safeio.temp_path(tmp_path / "x.pt").name == f".x.pt.tmp.{safeio.host()}.{os.getpid()}"
