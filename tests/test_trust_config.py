"""The read gate for configs: every numeric field declares its range, YAML is bounded,
and fuzzed ``--set`` values and YAML documents end in a config or one ConfigError.

The reference for "what is valid" is each field's declared range (pipelines/bounds.py);
the tests check that every numeric field has one, that validate() enforces each of them
through the same path a user takes (``--set``), and that nothing else escapes.
"""

import dataclasses
import math
import os
import typing

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bt_fast import config, yamlconf
from bt_fast.cli import main
from bt_fast.errors import ConfigError
from bt_fast.pipelines import bounds

# BT_FAST_FUZZ_EXAMPLES=2000 for a longer hunt; the suite keeps it small.
FUZZ = settings(max_examples=int(os.environ.get("BT_FAST_FUZZ_EXAMPLES", 60)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def config_classes() -> list[type]:
    """Every dataclass reachable from Config (sections, method configs, ViewSpec)."""
    seen, todo = [], [config.Config]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for t in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(t):
                    todo.append(t)
    return seen


def numeric_keys() -> list[tuple[str, bounds.Range, typing.Any]]:
    """(--set key, declared range, default) of every numeric field of a default Config."""
    out = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if "range" in f.metadata:
                out.append((prefix + f.name, f.metadata["range"], value))
            elif dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if dataclasses.is_dataclass(item):
                        walk(item, f"{prefix}{f.name}.{i}.")
    walk(config.Config(), "")
    return out


def test_every_numeric_field_declares_its_range():
    classes = config_classes()
    assert {c.__name__ for c in classes} >= {"DataConfig", "OptimConfig", "ViewSpec", "BYOLConfig",
                                             "VICRegConfig", "SimCLRConfig", "BarlowTwinsConfig"}
    missing = [f"{cls.__name__}.{name}" for cls in classes for name, f in bounds.numeric_fields(cls)
               if "range" not in f.metadata]
    assert not missing, f"numeric config fields without a declared range: {missing}"
    for name, rng, default in numeric_keys():  # and every default lies inside its own range
        assert rng.problem(default) is None, (name, default, rng)


def outside(rng: bounds.Range, default):
    """A value just outside ``rng`` of the default's shape (NaN when it is unbounded)."""
    as_int = isinstance(default, int) or (isinstance(default, tuple) and isinstance(default[0], int))
    if rng.lo is not None:
        bad = rng.lo if rng.lo_open else rng.lo - 1
    else:
        bad = rng.hi if rng.hi_open else rng.hi + 1
    bad = int(bad) if as_int and float(bad).is_integer() else bad
    return [bad] + list(default[1:]) if isinstance(default, tuple) else bad


@pytest.mark.parametrize("key, rng, default", numeric_keys(), ids=lambda v: v if isinstance(v, str) else "")
def test_validate_enforces_each_declared_range_naming_the_key(key, rng, default):
    bad = outside(rng, default)
    with pytest.raises(ConfigError) as e:
        config.validate(config.load(None, [f"{key}={yamlconf.yaml_value(bad)}"]))
    section, _, leaf = key.rpartition(".")
    # Sections built on load name "section: leaf=..." (views as views[i]); the rest "key=...".
    named = key in str(e.value) or (leaf in str(e.value) and section.split(".")[0] in str(e.value))
    assert named and "must be" in str(e.value), str(e.value)
    if isinstance(default, float):  # NaN passes every "<" test: refused all the same
        with pytest.raises(ConfigError, match="must be finite"):
            config.validate(config.load(None, [f"{key}=.nan"]))


@pytest.mark.parametrize("sets, needle", [
    (["views.0.scale=[0, 0]"], "scale=[0.0, 0.0]: must be in (0, 1]"),
    (["views.1.scale=[1.0, 0.08]"], "min <= max"),
    (["optim.lr_weights=-0.1"], "optim.lr_weights=-0.1: must be in [0, 1000]"),
    (["optim.momentum=5"], "optim.momentum=5.0: must be in [0, 1)"),
    (["views.0.std=[0.2, 0, 0.2]"], "std=[0.2, 0.0, 0.2]: must be in (0, 1]"),
    (["optim.epochs=inf"], "optim.epochs=inf: must be finite"),
])
def test_the_issue_examples_name_the_key(sets, needle):
    with pytest.raises(ConfigError) as e:
        config.validate(config.load(None, sets))
    assert needle in str(e.value)


# ------------------------------------------------------------------ YAML bounds


def laughs(levels: int, fanout: int) -> str:
    """A few hundred bytes of nested aliases that expand to fanout**levels strings."""
    lines = ['l0: &l0 "lol"']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return "train:\n  run_dir: " + "x\nextra:\n" + "".join(f"  {line}\n" for line in lines)


@pytest.mark.parametrize("text, needle", [
    (laughs(9, 9), "more than 64 aliases"),  # 81 aliases -> 387 M strings
    (laughs(6, 10), "more than 20000 values once aliases are expanded"),  # 60 aliases -> 1 M
    ("a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 32 levels"),
    ("train: &a {x: *a}\n", "alias refers to itself"),
    ("? [1, 2]\n: 3\n", "a mapping or list as a key"),
])
def test_hostile_yaml_is_one_config_error_naming_the_file(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert len(p.read_bytes()) < 1000  # small inputs: the danger is what they expand to
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert needle in str(e.value) and str(p) in str(e.value)
    assert len(str(e.value)) < 300


def test_non_utf8_and_oversized_yaml(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("train:\n  run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        config.load(p)
    big = tmp_path / "big.yaml"
    big.write_text("train:\n  run_dir: " + "x" * (yamlconf.MAX_BYTES + 1) + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        config.load(big)


def test_a_huge_value_is_cut_in_the_message(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  epochs: [" + ", ".join(["1"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "optim.epochs: expected float" in str(e.value) and len(str(e.value)) < 400


def test_hostile_yaml_through_the_cli_is_one_line(tmp_path, capsys):
    p = tmp_path / "bomb.yaml"
    p.write_text(laughs(6, 10))
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than 20000 values" in err and len(err) < 300


# ------------------------------------------------------------------ fuzzing

KEYS = sorted(set(
    f"{section}.{key}" for section, values in config.to_dict(config.Config()).items()
    if isinstance(values, dict) for key in values) | {
    f"views.{i}.{f.name}" for i in (0, 1) for f in dataclasses.fields(config.ViewSpec)})

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@FUZZ
@given(key=st.sampled_from(KEYS), value=values, raw=st.none() | st.text(max_size=30))
@example(key="method.name", value=[None], raw=None)  # found by this test: a TypeError once
@example(key="views.0.scale", value=None, raw="[0, 0]")
def test_fuzzed_set_values_give_a_config_or_one_config_error(key, value, raw):
    """Any value for any key (as YAML, or raw text): a valid run config or ConfigError."""
    item = f"{key}={raw if raw is not None else yamlconf.yaml_value(value)}"
    try:
        cfg = config.load(None, [item])
        config.validate(cfg)
    except ConfigError as e:
        assert "\n" not in " ".join(str(e).split()) and len(str(e)) < 1000
        return
    for problem in bounds.problems(cfg):  # accepted: then every range holds
        pytest.fail(problem)
    assert all(math.isfinite(v) for _, _, v in [(k, r, getattr_path(cfg, k)) for k, r, _ in numeric_keys()]
               for v in (v if isinstance(v, tuple) else (v,)))


def getattr_path(obj, key: str):
    for part in key.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


documents = st.recursive(scalars | st.sampled_from(["&a 1", "*a", "!!python/object:os.system", "{", "- -"]),
                         lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.sampled_from(["train", "optim", "views", "data", "x"])
                                           | st.text(max_size=4), inner, max_size=4), max_leaves=12)


@FUZZ
@given(doc=documents, noise=st.binary(max_size=40))
def test_fuzzed_yaml_documents_give_a_config_or_one_config_error(tmp_path_factory, doc, noise):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    for data in (yaml.safe_dump(doc).encode(), noise, yaml.safe_dump(doc).encode()[:17] + noise):
        path.write_bytes(data)
        try:
            config.validate(config.load(path))
        except ConfigError as e:
            assert str(path) in str(e) and len(str(e)) < 1000


def test_merge_keys_work_and_explicit_keys_override_them(tmp_path):
    """``<<: *anchor`` (YAML's merge key) once failed as an unknown tag; duplicates stay errors."""
    q = tmp_path / "m.yaml"
    q.write_text("views:\n  - &v {size: 16, blur_p: 1.0}\n  - {<<: *v, blur_p: 0.1}\n")
    assert [(v.size, v.blur_p) for v in config.load(q).views] == [(16, 1.0), (16, 0.1)]
    q.write_text("views:\n  - &v {size: 16, blur_p: 1.0}\n  - {<<: *v, blur_p: 0.1, blur_p: 0.2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'blur_p'"):
        config.load(q)


@pytest.mark.parametrize("spec", ["layer4:5000", "layer4:0", "layer4:\u0663", "layer9:1", "layer4"])
def test_readout_grid_is_bounded(spec):
    """A grid of 5000 x 5000 cells once allocated until the machine ran out of memory."""
    with pytest.raises(ConfigError, match="grid side 1-32"):
        config.load(None, [f"model.readout={spec}"])
