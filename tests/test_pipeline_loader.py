"""MultiViewLoader on generated JPEGs: shapes, layout, seeds, coin frequencies, sharding,
exact resume and refused states. Tiny images (16-24 px) keep it fast on 2 cores."""

import io
import math
import tarfile

import pytest
import torch

from bt_fast.data import make_synthetic
from bt_fast.pipelines import FolderSource, MultiViewLoader, ViewSpec, WebDatasetSource, presets
from bt_fast.pipelines.errors import SourceError, StateMismatch


@pytest.fixture(scope="module")
def data(tiny_imagefolder):
    return tiny_imagefolder  # root/train: 64 images, root/val: 16 images (conftest)


@pytest.fixture(scope="module")
def src(data):
    return FolderSource(data / "train")


def small_views():
    return [ViewSpec(size=16, blur_p=1.0, solarize_p=0.0), ViewSpec(size=12, blur_p=0.1, solarize_p=0.2)]


def flat(views):
    return torch.cat([v.flatten() for v in views])


def test_shapes_dtype_channels_last(src):
    loader = MultiViewLoader(src, small_views(), 8)
    assert len(loader) == 8
    batches = list(loader)
    assert len(batches) == 8
    views, labels = batches[0]
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16), (8, 3, 12, 12)]
    for v in views:
        assert v.dtype == torch.float32 and v.device.type == "cpu"
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert v.stride() == (v.shape[2] * v.shape[3] * 3, 1, v.shape[3] * 3, 3)
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    # One epoch visits every image once: labels are 16 of each class.
    all_labels = torch.cat([lab for _, lab in batches])
    assert torch.bincount(all_labels).tolist() == [16, 16, 16, 16]
    # Normalized values: roughly zero-centred, within the ImageNet-normalized range.
    assert -2.2 < views[0].min() and views[0].max() < 2.7


def test_outputs_are_owned(src):
    """Batches kept by the caller must not change when later batches are produced: the
    loader hands DALI's buffers out zero-copy, so DALI must never reuse a held buffer
    (over two epochs: more batches than any prefetch queue)."""
    loader = MultiViewLoader(src, small_views(), 8)
    kept, copies = [], []
    for _ in range(2):
        for views, labels in loader:
            kept.append(views + [labels])
            copies.append([t.clone() for t in kept[-1]])
    assert len(kept) == 16
    assert len({t.data_ptr() for batch in kept for t in batch}) == 16 * 3
    assert all(torch.equal(a, b) for ka, kb in zip(kept, copies) for a, b in zip(ka, kb))


def test_same_seed_same_batches_other_seed_differs(src):
    a = [flat(v) for v, _ in MultiViewLoader(src, small_views(), 8, seed=3)]
    b = [flat(v) for v, _ in MultiViewLoader(src, small_views(), 8, seed=3)]
    c = [flat(v) for v, _ in MultiViewLoader(src, small_views(), 8, seed=4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def binomial_ok(k: int, n: int, p: float, z: float = 4.5) -> bool:
    sd = math.sqrt(n * p * (1 - p))
    return abs(k - n * p) <= z * sd + 1e-9


def test_coin_frequencies_match_the_recipe(src):
    views = presets.barlow_twins(size=12)
    loader = MultiViewLoader(src, views, 32, debug=True)
    counts, n = {}, 0
    for _ in range(8):  # 8 epochs x 64 images = 512 samples per view
        for _views, _labels, coins in loader:
            n += coins["flip"].shape[0]
            for name, c in coins.items():
                counts[name] = counts.get(name, 0) + c.sum(0)
    assert n == 512
    for i, spec in enumerate(views):
        expected = {"flip": spec.flip_p, "jitter": spec.jitter_p, "grayscale": spec.grayscale_p,
                    "blur": spec.blur_p, "solarize": spec.solarize_p}
        for name, p in expected.items():
            k = int(counts[name][i])
            assert binomial_ok(k, n, p), f"view {i} {name}: {k}/{n} with p={p}"


def test_skipped_ops_leave_pixels_alone(src):
    """With every probability 0 the views equal a plain crop+normalize (no op leaks)."""
    plain = ViewSpec(size=16, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    gray = ViewSpec(size=16, flip_p=0.0, jitter_p=0.0, grayscale_p=1.0, blur_p=0.0, solarize_p=0.0)
    (v_plain,), _ = next(iter(MultiViewLoader(src, [plain], 8)))
    (v_gray,), _ = next(iter(MultiViewLoader(src, [gray], 8)))
    mean = torch.tensor(plain.mean).view(1, 3, 1, 1)
    std = torch.tensor(plain.std).view(1, 3, 1, 1)
    rgb = v_gray * std + mean
    assert (rgb.max(1).values - rgb.min(1).values).max() < 0.02  # grey: channels equal
    assert (v_plain * std + mean).std(1).mean() > 0.01  # colour kept


def run_steps(loader, n, start=()):
    out = list(start)
    while len(out) < n:
        for views, _ in loader:
            out.append(flat(views))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("stop_after", [2, 4, 5, 7])
def test_resume_is_exact(src, stop_after):
    """Stop after k batches (4 = the end of epoch 0), save, reload in a new loader."""
    views = small_views()
    reference = run_steps(MultiViewLoader(src, views, 16), 10)
    loader = MultiViewLoader(src, views, 16)
    head = run_steps(loader, stop_after)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = run_steps(MultiViewLoader(src, views, 16, state=state), 10, head)
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed))


def test_state_from_other_world_size_or_dataset_is_refused(src, data, tmp_path):
    state = MultiViewLoader(src, small_views(), 8).state_dict()
    with pytest.raises(ValueError, match="number of shards"):
        MultiViewLoader(src, small_views(), 8, num_shards=2, state=state)
    other = make_synthetic(tmp_path / "other", classes=4, train_per_class=16, seed=1)
    with pytest.raises(ValueError, match="dataset"):
        MultiViewLoader(FolderSource(other / "train"), small_views(), 8, state=state)
    with pytest.raises(ValueError, match="shard id"):
        MultiViewLoader(src, small_views(), 8, shard_id=1, num_shards=2,
                        state=MultiViewLoader(src, small_views(), 8, num_shards=2).state_dict())


def test_missing_file_list_names_the_fix(tmp_path):
    with pytest.raises(SourceError, match="bt-fast data check"):
        FolderSource(tmp_path)


def test_shards_same_length_disjoint_and_seeded_per_rank(src):
    # 64 images over 3 shards: 21/21/22 images; batch 11 -> 1 batch each (the 22-image
    # shard has a second, padded batch that the loader must drop).
    views = [ViewSpec(size=12)]
    loaders = [MultiViewLoader(src, views, 11, shard_id=r, num_shards=3) for r in range(3)]
    assert [len(ld) for ld in loaders] == [1, 1, 1]
    for _epoch in range(3):
        got = [list(ld) for ld in loaders]
        assert [len(g) for g in got] == [1, 1, 1]
    # Two shards of one epoch read disjoint halves: together all 64 images once.
    halves = [MultiViewLoader(src, views, 32, shard_id=r, num_shards=2) for r in range(2)]
    labels = torch.cat([lab for ld in halves for _, lab in ld])
    assert torch.bincount(labels).tolist() == [16, 16, 16, 16]


def test_each_epoch_reads_the_next_shard_once(tmp_path):
    """One loader epoch is one DALI epoch: over num_shards epochs a rank reads every image
    exactly once (shards rotate per epoch). Draining the DALI iterator with ``for`` used
    to reset it and run a whole discarded epoch, so rank 0 of 2 saw shard 0 forever."""
    root = make_synthetic(tmp_path, classes=16, train_per_class=1, val_per_class=1, size=(24, 20))
    loader = MultiViewLoader(FolderSource(root / "train"), [ViewSpec(size=8)], 4, shard_id=0, num_shards=2)
    epochs = [torch.cat([lab for _, lab in loader]) for _ in range(2)]
    assert [len(e) for e in epochs] == [8, 8]
    assert sorted(torch.cat(epochs).tolist()) == list(range(16))


def write_shards(data, out, shards=2):
    """The synthetic train set as WebDataset tars; labels shifted to two digits + newline."""
    src = FolderSource(data / "train")
    paths = [out / f"train-{i:03d}.tar" for i in range(shards)]
    for i, path in enumerate(paths):
        with tarfile.open(path, "w") as tar:
            for j in range(i, len(src), shards):
                for ext, payload in (("jpg", (data / "train" / src.paths[j]).read_bytes()),
                                     ("cls", f"{src.labels[j] + 10}\n".encode())):
                    info = tarfile.TarInfo(f"{j:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return paths


def test_webdataset_reader(data, tmp_path):
    paths = write_shards(data, tmp_path)
    wds = WebDatasetSource(paths)
    assert len(wds) == 64
    loader = MultiViewLoader(wds, small_views(), 16)
    batches = list(loader)
    assert len(batches) == 4
    labels = torch.cat([lab for _, lab in batches])
    assert torch.bincount(labels - 10).tolist() == [16, 16, 16, 16]
    assert batches[0][0][0].shape == (16, 3, 16, 16)
    # Resume works the same way through the tar reader.
    loader = MultiViewLoader(wds, small_views(), 16)
    head = run_steps(loader, 2)
    resumed = run_steps(MultiViewLoader(wds, small_views(), 16, state=loader.state_dict()), 6, head)
    reference = run_steps(MultiViewLoader(wds, small_views(), 16), 6)
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed))


@pytest.mark.gpu
def test_gpu_device_same_contract(src):
    loader = MultiViewLoader(src, small_views(), 8, device="gpu")
    views, labels = next(iter(loader))
    assert all(v.is_cuda and v.is_contiguous(memory_format=torch.channels_last) for v in views)
    assert labels.is_cuda and labels.dtype == torch.int64


def test_image_gone_bad_after_check_is_named(tmp_path):
    """DALI's decoder error names no file; the loader finds and names it."""
    root = make_synthetic(tmp_path / "d", classes=2, train_per_class=8, val_per_class=1, size=(24, 24))
    src = FolderSource(root / "train")
    bad = root / "train" / "class1" / "0005.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated after the check
    with pytest.raises(SourceError, match=r"class1/0005\.jpg: .*listed in .*filelist\.txt"):
        for _ in range(2):
            list(MultiViewLoader(src, small_views(), 4))


def test_position_only_resume_after_the_list_lost_files(tmp_path):
    root = make_synthetic(tmp_path / "d", classes=2, train_per_class=8, val_per_class=1, size=(24, 24))
    loader = MultiViewLoader(FolderSource(root / "train"), small_views(), 4)
    it = iter(loader)
    next(it)
    state = loader.state_dict()  # epoch 0, batch 1
    (root / "train" / "class1" / "0005.jpg").unlink()
    from bt_fast.data import check
    check(root / "train")
    smaller = FolderSource(root / "train")
    with pytest.raises(ValueError, match="dataset"):
        MultiViewLoader(smaller, small_views(), 4, state=state)
    resumed = MultiViewLoader(smaller, small_views(), 4, state=state, position_only=True)
    assert (resumed.epoch, len(resumed), len(list(resumed))) == (1, 3, 3)


def test_state_from_the_other_data_device_is_refused(src):
    state = MultiViewLoader(src, small_views(), 8).state_dict()
    state["device"] = "gpu"
    with pytest.raises(StateMismatch, match="data device .*checkpoint has 'gpu'"):
        MultiViewLoader(src, small_views(), 8, state=state)


def test_state_written_before_the_device_was_recorded_resumes_on_the_cpu(src):
    a = MultiViewLoader(src, small_views(), 8)
    it = iter(a)
    next(it)
    state = a.state_dict()
    expected = [v.clone() for v in next(it)[0]]
    old = {k: v for k, v in state.items() if k != "device"} | {"format": 2}
    views, _ = next(iter(MultiViewLoader(src, small_views(), 8, state=old)))
    assert all(torch.equal(x, y) for x, y in zip(views, expected))
    with pytest.raises(StateMismatch, match="data device"):
        MultiViewLoader(src, small_views(), 8, device="gpu", state=old)


def test_fewer_images_than_one_batch_is_a_data_error(src):
    with pytest.raises(SourceError, match=r"train: 64 images over 1 shard.* no full batch of 65"):
        MultiViewLoader(src, small_views(), 65)
