"""The semi-supervised subset: class-balanced, deterministic for a seed, disjoint from val."""

from collections import Counter

import numpy as np
import pytest

from bt_fast.data import make_synthetic
from bt_fast.eval.features import EvalError, ImageList
from bt_fast.eval.semi import balanced_subset, check_disjoint


def _labels():
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(10), [600, 650, 700, 600, 610, 620, 900, 600, 601, 605]))


@pytest.mark.parametrize("percent", [1, 10])
def test_subset_is_class_balanced(percent):
    labels = _labels()
    idx = balanced_subset(labels, percent, seed=0)
    counts = Counter(labels[idx].tolist())
    assert sorted(counts) == list(range(10))
    assert len(set(counts.values())) == 1
    assert counts[0] == round(percent / 100 * len(labels) / 10)
    assert len(set(idx)) == len(idx) and idx == sorted(idx)


def test_subset_is_deterministic_for_a_seed_and_varies_with_it():
    labels = _labels()
    assert balanced_subset(labels, 10, seed=3) == balanced_subset(labels.copy(), 10, seed=3)
    assert balanced_subset(labels, 10, seed=3) != balanced_subset(labels, 10, seed=4)


def test_subset_capped_by_smallest_class_and_bad_percent():
    labels = np.array([0] * 50 + [1] * 3)
    idx = balanced_subset(labels, 50, seed=0)
    assert Counter(labels[idx].tolist()) == {0: 3, 1: 3}
    with pytest.raises(EvalError):
        balanced_subset(labels, 0, seed=0)


def test_subset_comes_from_train_and_is_disjoint_from_val(tmp_path):
    root = make_synthetic(tmp_path / "d", classes=3, train_per_class=20, val_per_class=5, size=(16, 16))
    train, val = ImageList(root / "train", None), ImageList(root / "val", None)
    idx = balanced_subset(train.labels, 10, seed=0)
    subset = ImageList(root / "train", None, idx)
    check_disjoint(subset, val)  # no exception
    files = {(subset.root / p).resolve() for p in subset.paths}
    assert files.isdisjoint({(val.root / p).resolve() for p in val.paths})
    assert all(f.is_relative_to((root / "train").resolve()) for f in files)
    with pytest.raises(EvalError, match="are also in val"):
        check_disjoint(ImageList(root / "val", None), val)
