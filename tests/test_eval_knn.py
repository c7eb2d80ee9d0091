"""Weighted kNN against a brute-force numpy reference on random features."""

import numpy as np
import pytest
import torch

from bt_fast.eval.knn import knn_accuracy, knn_scores, knn_scores_multi, topk_accuracy


def knn_reference(train, train_labels, query, k, temperature, num_classes):
    """One query at a time, float64, straight from the definition."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    scores = np.zeros((len(query), num_classes))
    for q in range(len(query)):
        sims = train @ query[q]
        nearest = np.argsort(-sims)[:k]
        for i in nearest:
            scores[q, train_labels[i]] += np.exp(sims[i] / temperature)
    return scores


@pytest.mark.parametrize("k", [1, 7, 50])
def test_knn_scores_match_bruteforce(k):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 6, 300)
    query = rng.normal(size=(45, 16)).astype(np.float32)
    want = knn_reference(train.astype(np.float64), labels, query.astype(np.float64), k, 0.07, 6)
    # chunk=8 so several chunks (and a ragged last one) are exercised
    got = knn_scores(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(query),
                     k=k, temperature=0.07, num_classes=6, chunk=8).double().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-4)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_multi_k_equals_single_k_and_k_capped_at_n():
    g = torch.Generator().manual_seed(1)
    train, query = torch.randn(40, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    multi = knn_scores_multi(train, labels, query, ks=(5, 200), num_classes=3)
    torch.testing.assert_close(multi[5], knn_scores(train, labels, query, k=5, num_classes=3))
    # k larger than the training set: every training point votes
    want = knn_reference(train.double().numpy(), labels.numpy(), query.double().numpy(), 40, 0.07, 3)
    np.testing.assert_allclose(multi[200].double().numpy(), want, rtol=2e-4)


def test_knn_accuracy_on_clustered_features():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(5, 32, generator=g) * 3
    tr_y, va_y = torch.arange(200) % 5, torch.arange(50) % 5
    tr_x = centers[tr_y] + torch.randn(200, 32, generator=g)
    va_x = centers[va_y] + torch.randn(50, 32, generator=g)
    acc = knn_accuracy(tr_x, tr_y, va_x, va_y, ks=(20, 200))
    assert set(acc) == {20, 200}
    assert acc[20]["top1"] == 100.0 and acc[20]["top5"] == 100.0


def test_topk_accuracy_caps_k_at_classes():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    acc = topk_accuracy(scores, torch.tensor([1, 2]))
    assert acc[1] == 50.0 and acc[5] == 100.0
