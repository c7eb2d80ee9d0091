"""Checkpoints validated on load: older layouts, other tools' files and doctored ones are
one line (CheckpointError / ResumeError / EvalError), never a traceback; Hypothesis
doctors a real trainer checkpoint and drives it through the resume and eval paths."""

import copy
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bt_fast import checkpoint, config, dist, methods, optim, run_folder
from bt_fast.checkpoint_schema import problems
from bt_fast.errors import MAX_LINE, USER_ERRORS, CheckpointError, one_line
from bt_fast.eval.features import load_backbone
from conftest import CONFIGS

CFG = config.load(CONFIGS / "smoke.yaml")


torch.manual_seed(0)
MODEL = methods.build(CFG)  # built once (about half a second); each use starts from INITIAL
INITIAL = copy.deepcopy(MODEL.state_dict())


def fresh():
    MODEL.load_state_dict(INITIAL)
    return MODEL, optim.build(MODEL, CFG.optim), torch.amp.GradScaler("cpu", enabled=False)


def trainer_checkpoint() -> dict:
    """A checkpoint as train.save_checkpoint writes it, after one real LARS step."""
    model, optimizer, scaler = fresh()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": 1, "rng": [checkpoint.rng_state()], "pipeline": [{"dali": "", "epoch": 0}],
            "config": config.to_dict(CFG), "data_entries": torch.arange(4, dtype=torch.int64)}


GOOD = trainer_checkpoint()


def save(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())
    return path


def test_the_trainers_own_checkpoint_passes_both_needs():
    assert problems(GOOD, "resume") == [] and problems(GOOD, "weights") == []


@pytest.mark.parametrize("doctor, need, needle", [
    (lambda c: c.pop("optimizer"), "resume", "missing 'optimizer' (an older layout"),
    (lambda c: (c.pop("rng"), c.pop("pipeline")), "resume", "missing 'rng', 'pipeline'"),
    (lambda c: c.update(model={"conv1.weight": torch.zeros(1)}), "weights", "no 'backbone.*' tensors"),
    (lambda c: c["model"].update({"backbone.conv1.weight": "weights"}), "weights", "is a str, not a tensor"),
    (lambda c: c.update(step=-3), "weights", "'step' must be an integer >= 0"),
    (lambda c: c.update(config=[1, 2]), "weights", "'config' must be a mapping"),
    (lambda c: c["rng"][0].update(torch=torch.zeros(3)), "resume", "'rng[0]'.torch must be a uint8 vector"),
    (lambda c: c["optimizer"]["param_groups"][0].update(lr="fast"), "resume", "lr' is a str, not a number"),
    (lambda c: c.update(pipeline={"dali": ""}), "resume", "one entry per rank"),
    (lambda c: c.update(method_state=["queue"]), "resume", "'method_state[0]' is a str, not a mapping"),
])
def test_older_foreign_and_doctored_layouts_are_one_line(tmp_path, doctor, need, needle):
    ckpt = copy.deepcopy(GOOD)
    doctor(ckpt)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(save(ckpt, tmp_path / "x.pt"), need=need)
    assert needle in str(e.value) and str(tmp_path / "x.pt") in str(e.value) and "\n" not in str(e.value)


def test_a_plain_torchvision_state_dict_is_another_tools_file(tmp_path):
    import torchvision

    path = save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pt")
    with pytest.raises(CheckpointError, match="missing 'model', 'config'"):
        checkpoint.load(path)


def test_an_optimizer_state_of_another_shape_is_a_resume_error(tmp_path):
    ckpt = copy.deepcopy(GOOD)
    pid = next(iter(ckpt["optimizer"]["state"]))
    ckpt["optimizer"]["state"][pid]["mu"] = torch.zeros(2, 2)
    model, optimizer, scaler = fresh()
    with pytest.raises(USER_ERRORS, match="optimizer state 'mu' of parameter .* has shape \\(2, 2\\)"):
        run_folder.resume(ckpt, tmp_path / "x.pt", model, optimizer, scaler, dist.Env())


# ---------------------------------------------------------------- Hypothesis

DELETE = object()


def paths(obj, prefix=(), depth=0):
    """Every key/index path into the checkpoint, down to 4 levels (tensors are leaves)."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        out.append(prefix + (key,))
        if depth < 4 and not torch.is_tensor(value) and not (isinstance(value, (list, tuple)) and len(value) > 8):
            out += paths(value, prefix + (key,), depth + 1)
    return out


PATHS = [p for p in paths(GOOD) if not (p[0] == "model" and len(p) > 1 and "layer" in str(p[1]))]
TENSORS = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                    st.lists(st.integers(0, 3), max_size=3),
                    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]))
VALUES = st.one_of(st.just(DELETE), st.none(), st.booleans(), st.integers(-2**70, 2**70),
                   st.floats(allow_nan=True), st.text(max_size=6), st.binary(max_size=6),
                   st.lists(st.integers(-5, 5), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                   TENSORS)


def doctored(mutations) -> dict:
    ckpt = copy.deepcopy(GOOD)
    for path, value in mutations:
        parent = ckpt
        try:
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, tuple):
                continue  # python RNG state: doctored through its parent instead
            if value is DELETE:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the path
    return ckpt


def assert_one_line(error) -> None:
    """The CLI's contract: one_line folds and cuts whatever the message holds."""
    line = one_line("train", error)
    assert "\n" not in line and len(line) <= len("bt-fast train: config error: ") + MAX_LINE


def drive(ckpt, tmp_path, weights_too: bool = True) -> None:
    """Every path a checkpoint takes: load for resume then resume + one optimizer step;
    load for weights then the eval backbone. Only one-line errors may come out."""
    path = save(ckpt, tmp_path / "doctored.pt")
    try:
        loaded = checkpoint.load(path, need="resume")
        model, optimizer, scaler = fresh()
        run_folder.resume(loaded, path, model, optimizer, scaler, dist.Env())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    except USER_ERRORS as e:
        assert_one_line(e)
    if not weights_too:
        return
    try:
        load_backbone(path, device=torch.device("cpu"))
    except USER_ERRORS as e:
        assert_one_line(e)


MUTATIONS = st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(MUTATIONS)
def test_doctored_checkpoints_are_one_line_never_a_traceback(tmp_path, mutations):
    # The eval path builds a backbone (~0.5 s): only when the weights' part was doctored.
    weights = any(path[0] in ("model", "config", "step") for path, _ in mutations)
    drive(doctored(mutations), tmp_path, weights_too=weights)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(MUTATIONS)
def test_doctored_checkpoints_many(tmp_path, mutations):
    drive(doctored(mutations), tmp_path)
