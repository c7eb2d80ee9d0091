"""swav_loss and dino_loss (and their references) against their formulas written out here in
float64, sample by sample; the 2- and 3-rank checks are in test_loss_multicrop_distributed.py."""

import math

import pytest
import torch

from bt_fast.kernels import (dino_batch_center, dino_loss, dino_loss_reference, sinkhorn, sinkhorn_reference,
                             swav_loss, swav_loss_reference)
from test_loss_kernels import assert_ignores_autocast

UPSTREAM = 1.7
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1e-2)}  # (loss, grad)


def sinkhorn64(scores, epsilon, iters):
    """The paper's Sinkhorn-Knopp, entry by entry: P = exp(S / eps) / total, then alternately
    every prototype's column to mass 1/K and every sample's row to mass 1/B; B x P."""
    s = scores.detach().double()
    b, k = s.shape
    p = [[math.exp(s[n, j].item() / epsilon) for j in range(k)] for n in range(b)]
    total = sum(map(sum, p))
    p = [[x / total for x in row] for row in p]
    for _ in range(iters):
        cols = [sum(p[n][j] for n in range(b)) for j in range(k)]
        p = [[p[n][j] / cols[j] / k for j in range(k)] for n in range(b)]
        p = [[x / sum(row) / b for x in row] for row in p]
    return torch.tensor(p, dtype=torch.float64) * b


def log_softmax64(row):
    """x_k - log sum_j exp(x_j) of one float64 row (shifted by its max, a constant)."""
    m = row.detach().max()
    return row - (m + (row - m).exp().sum().log())


def swav64(scores, n_global, t, epsilon, iters, queue=None):
    """(1/n_global) sum_i (1/(V-1)) sum_{v != i} mean_n -sum_k q_i,nk log softmax(s_v,n / t)_k;
    with a ``queue`` (one [L, K] per global crop), q_i is the batch's rows of the codes of
    the queue's rows and the batch's together."""
    s = [x.double() for x in scores]
    total = 0
    for i in range(n_global):
        rows = s[i] if queue is None else torch.cat([queue[i].detach().double(), s[i]])
        q = sinkhorn64(rows, epsilon, iters)[len(rows) - len(s[i]):]
        sub = 0
        for v in range(len(s)):
            if v != i:
                sub = sub + sum(-(q[n] * log_softmax64(s[v][n] / t)).sum() for n in range(len(q))) / len(q)
        total = total + sub / (len(s) - 1)
    return total / n_global


def dino64(student, teacher, center, ts, tt):
    """Mean over pairs (i, v != i) of mean_n -sum_k softmax((y_i,n - c)/tt)_k log softmax(x_v,n / ts)_k."""
    terms = []
    for i, y in enumerate(teacher):
        p = [log_softmax64((y[n].detach().double() - center.double()) / tt).exp() for n in range(len(y))]
        for v, x in enumerate(student):
            if v != i:
                terms.append(sum(-(p[n] * log_softmax64(x[n].double() / ts)).sum() for n in range(len(x))) / len(x))
    return sum(terms) / len(terms)


def unit_scores(n, k, crops, seed=0, d=8):
    """Cosine scores of random unit embeddings against random unit prototypes: [n, K] per crop."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = [torch.nn.functional.normalize(base + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
         for _ in range(crops)]
    return [x @ protos.T for x in z]


def dino_outputs(n, k, crops, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, k, generator=g, dtype=torch.float64)
    student = [base + torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(crops)]
    teacher = [base + 0.5 * torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(2)]
    return student, teacher, 0.3 * torch.randn(k, generator=g, dtype=torch.float64)


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _run(fn, tensors, dtype):
    xs = [t.detach().to(dtype).clone().requires_grad_(True) for t in tensors]
    loss = fn(xs)
    (loss * UPSTREAM).backward()
    return loss, [x.grad for x in xs]


@pytest.mark.parametrize("iters", [1, 3])
def test_sinkhorn_matches_the_papers_formula(iters):
    s = unit_scores(11, 6, 1, seed=3)[0]
    want = sinkhorn64(s, 0.05, iters)
    for got in (sinkhorn(s, epsilon=0.05, iters=iters), sinkhorn_reference(s, epsilon=0.05, iters=iters)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(want.sum(1), torch.ones(11, dtype=torch.float64))  # an assignment per sample
    # more iterations: every prototype's share goes to B/K (the equipartition constraint)
    many = sinkhorn(s, epsilon=0.05, iters=200)
    torch.testing.assert_close(many.sum(0), torch.full((6,), 11 / 6, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("crops,n_global", [(4, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [swav_loss, swav_loss_reference])
def test_swav_matches_float64_formula(fn, dtype, crops, n_global):
    scores = [s.to(dtype).double() for s in unit_scores(9, 5, crops)]  # the values dtype can hold
    kw = dict(n_global=n_global, temperature=0.2, epsilon=0.05, iters=3)
    want, wants = _run(lambda xs: swav64(xs, n_global, 0.2, 0.05, 3), scores, torch.float64)
    loss, grads = _run(lambda xs: fn(xs, **kw), scores, dtype)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    assert abs(loss.double() - want).item() <= loss_tol * want.item()
    for g, w in zip(grads, wants):
        if w is None:  # one global crop: it only gives codes, it predicts nothing
            assert g is None and n_global == 1
            continue
        assert g.dtype == dtype and _rel(g, w) <= grad_tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fn", [swav_loss, swav_loss_reference])
def test_swav_with_a_queue_matches_float64_formula(fn, dtype):
    """The queue's rows join each global crop's Sinkhorn-Knopp; only the batch's codes are
    targets, and the queue gets no gradient. L = 13 rows against a batch of 9."""
    scores = [s.to(dtype).double() for s in unit_scores(9, 5, 4)]
    queue = [s.to(dtype).double() for s in unit_scores(13, 5, 2, seed=7)]
    kw = dict(n_global=2, temperature=0.2, epsilon=0.05, iters=3)
    want, wants = _run(lambda xs: swav64(xs[:4], 2, 0.2, 0.05, 3, queue=xs[4:]), scores + queue, torch.float64)
    loss, grads = _run(lambda xs: fn(xs[:4], queue_scores=xs[4:], **kw), scores + queue, dtype)
    loss_tol, grad_tol = TOL[dtype]
    assert abs(loss.double() - want).item() <= loss_tol * want.item()
    for g, w in zip(grads[:4], wants[:4]):
        assert g.dtype == dtype and _rel(g, w) <= grad_tol
    assert grads[4] is None and grads[5] is None  # codes carry no gradient, the queue's least of all
    # the queue changes the codes; an empty one changes nothing
    plain = swav_loss([x.to(dtype) for x in scores], **kw)
    assert abs(loss.item() - plain.item()) > 1e-3
    empty = [torch.zeros(0, 5, dtype=dtype)] * 2
    assert torch.equal(swav_loss([x.to(dtype) for x in scores], queue_scores=empty, **kw), plain)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [dino_loss, dino_loss_reference])
def test_dino_matches_float64_formula_and_stops_the_teacher_gradient(fn, dtype):
    student, teacher, center = dino_outputs(7, 10, 5)
    student, teacher = [x.to(dtype).double() for x in student], [y.to(dtype).double() for y in teacher]
    want, wants = _run(lambda xs: dino64(xs[:5], xs[5:], center, 0.1, 0.04), student + teacher, torch.float64)
    loss, grads = _run(lambda xs: fn(xs[:5], xs[5:], center.to(dtype), student_temp=0.1, teacher_temp=0.04),
                       student + teacher, dtype)
    loss_tol, grad_tol = TOL[dtype]
    if dtype == torch.bfloat16:  # the centre itself is rounded to bf16 here
        loss_tol = 1e-2
    assert abs(loss.double() - want).item() <= loss_tol * want.item()
    for g, w in zip(grads[:5], wants[:5]):
        assert g.dtype == dtype and _rel(g, w) <= grad_tol
    assert grads[5] is None and grads[6] is None  # the teacher learns by moving average only


def test_known_values_and_invariances():
    k = 6
    # SwAV: equal scores everywhere -> uniform codes and uniform predictions: loss = log K
    flat = [torch.zeros(4, k) for _ in range(3)]
    assert abs(swav_loss(flat).item() - math.log(k)) <= 1e-6
    # DINO: a constant teacher and student -> both uniform: loss = log K, centre irrelevant
    assert abs(dino_loss(flat, flat[:2], torch.randn(k)).item() - math.log(k)) <= 1e-6
    # DINO: adding a constant to a row changes no softmax
    student, teacher, center = dino_outputs(5, k, 4, seed=2)
    shifted = [x + 3.0 for x in student]
    torch.testing.assert_close(dino_loss(shifted, teacher, center), dino_loss(student, teacher, center))
    # the teacher temperature matters, and so does the centre
    assert dino_loss(student, teacher, center, teacher_temp=0.07) != dino_loss(student, teacher, center)
    assert dino_loss(student, teacher, 0 * center) != dino_loss(student, teacher, center)
    # the batch centre is the mean of every teacher row
    torch.testing.assert_close(dino_batch_center(teacher), torch.cat(teacher).mean(0))


def test_swav_and_dino_ignore_a_callers_autocast():
    s = [x.float() for x in unit_scores(6, 5, 4, seed=5)]
    assert_ignores_autocast(lambda a, b: swav_loss([a, b, *s[2:]]), s[0], s[1])
    student, teacher, center = dino_outputs(6, 5, 4, seed=6)
    student, teacher = [x.float() for x in student], [y.float() for y in teacher]
    assert_ignores_autocast(lambda a, b: dino_loss([a, b, *student[2:]], teacher, center.float()),
                            student[0], student[1])


def test_bad_input_is_named():
    s = [torch.randn(4, 5) for _ in range(3)]
    with pytest.raises(ValueError, match="same"):
        swav_loss([s[0], torch.randn(3, 5)])
    with pytest.raises(ValueError, match="n_global"):
        swav_loss(s, n_global=4)
    with pytest.raises(ValueError, match="temperature"):
        swav_loss(s, temperature=0)
    with pytest.raises(ValueError, match="list"):
        swav_loss(torch.randn(4, 5))
    with pytest.raises(ValueError, match="queue_scores must be a list of 2"):
        swav_loss(s, queue_scores=[torch.randn(6, 5)])
    with pytest.raises(ValueError, match=r"\[L, K=5\]"):
        swav_loss(s, queue_scores=[torch.randn(6, 5), torch.randn(6, 4)])
    with pytest.raises(ValueError, match="center"):
        dino_loss(s, s[:2], torch.zeros(4))
    with pytest.raises(ValueError, match="teacher"):
        dino_loss(s[:1], s[:2], torch.zeros(5))
