"""SwAV's queue for small batches (main_swav.py): per rank, FIFO of the global crops' unit
embeddings, used in Sinkhorn-Knopp once full, untouched by a skipped step, per-rank run
state that a checkpoint restores (the trainer's kill -9 test is in test_multicrop_train.py)."""

import pytest
import torch

from bt_fast import config, train
from bt_fast.errors import ConfigError
from bt_fast.kernels import swav_loss
from test_methods import tiny, views

B = 4  # batch; the queue below holds 3 steps' worth (L = 12) of each global crop


pytestmark = pytest.mark.usefixtures("one_thread")


def _queue_model(*extra):
    return tiny("swav", "method.swav.queue_length=12", *extra)[1]


def _step(model, seed, applied=True, step=0):
    """Forward on fresh crops, the loss, then after_step as the trainer calls it: the loss,
    the global crops' embeddings z [2 B, D] the step pushed."""
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(B, 3, s, s, generator=g) for s in (16, 16, 8)]
    out = model(crops)
    loss, _ = model.loss(out, None)
    z = model.queue_in.clone()
    model.after_step(step, 100, torch.tensor(applied))
    return loss, out, z


def test_queue_fills_fifo_and_joins_the_codes_once_full():
    model = _queue_model()
    pushed = []
    for seed in range(3):  # 3 pushes of B rows fill L = 12; no queue in the codes meanwhile
        loss, out, z = _step(model, seed)
        assert (model.queue_scores() is None) == (seed < 2)  # full after the third push
        torch.testing.assert_close(loss, swav_loss(out, temperature=0.1, epsilon=0.05, iters=3))
        pushed.append(z.reshape(2, B, -1))
    # newest first, per global crop: z of step 2, then step 1, then step 0
    torch.testing.assert_close(model.queue, torch.cat(pushed[::-1], dim=1))
    assert torch.allclose(model.queue.norm(dim=2), torch.ones(2, 12))  # unit embeddings
    # full: the 4th step's codes see the queue's scores against the CURRENT prototypes
    queue = model.queue.clone()
    loss, out, z = _step(model, 3)
    protos = model.prototypes.weight.detach()
    want = swav_loss([o.detach() for o in out], queue_scores=list(queue @ protos.T))
    torch.testing.assert_close(loss.detach(), want)
    assert abs(loss.item() - swav_loss([o.detach() for o in out]).item()) > 1e-4  # and it matters
    # the oldest step's rows fell out
    torch.testing.assert_close(model.queue, torch.cat([z.reshape(2, B, -1), queue[:, :8]], dim=1))


def test_skipped_step_leaves_the_queue_and_its_count_untouched():
    model = _queue_model()
    _step(model, 0)
    queue, rows = model.queue.clone(), model.queue_rows.clone()
    _step(model, 1, applied=False)
    assert torch.equal(model.queue, queue) and torch.equal(model.queue_rows, rows) and int(rows) == B


def test_queue_starts_at_its_step():
    model = _queue_model("method.swav.queue_start_steps=5")
    _step(model, 0, step=4)
    assert model.queue is None
    _step(model, 1, step=5)
    assert int(model.queue_rows) == B


def test_rank_state_round_trip_and_misfits():
    model = _queue_model()
    assert model.rank_state() == {}  # on, not started yet
    for seed in range(3):
        _step(model, seed)
    state = model.rank_state()
    other = _queue_model()
    assert other.load_rank_state(state, "cpu") is None
    assert torch.equal(other.queue, model.queue) and int(other.queue_rows) == 12
    assert other.queue_scores() is not None  # full again after resume
    longer = _queue_model("method.swav.queue_length=16")
    warning = longer.load_rank_state(state, "cpu")
    assert "does not fit method.swav.queue_length=16" in warning and longer.queue is None
    off = tiny("swav")[1]
    assert "not used" in off.load_rank_state(state, "cpu") and off.rank_state() is None
    assert off.load_rank_state(None, "cpu") is None


def test_queue_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"method.swav: queue_length=-1: must be in \[0, "):
        config.validate(config.load(None, ["method.name=swav", "method.swav.queue_length=-1"]))
    cfg = config.load(None, ["method.name=swav", "method.swav.queue_length=3000", "data.batch_size=768",
                             f"data.train_dir={tmp_path}"])
    train.check_data(cfg, [1, 2, 8])
    with pytest.raises(ConfigError, match="queue_length=3000 is not divisible by the world size 16"):
        train.check_data(cfg, [16])
    # another method ignores the swav section, queue included
    train.check_data(config.load(None, ["method.swav.queue_length=3001", f"data.train_dir={tmp_path}"]), [2])
