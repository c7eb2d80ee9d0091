"""GPU-only lines shown on the CPU by faking the device: views reach the model's device
(pinned, non-blocking) whatever data.device says; cuDNN flags follow the config."""

import pytest
import torch

from bt_fast import config, device


def views_cpu():
    return [torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), torch.randn(2, 3, 6, 6)]


def test_views_move_to_the_model_device_in_its_memory_format():
    out = device.place_views(views_cpu(), torch.device("meta"), channels_last=True)
    assert all(v.device.type == "meta" for v in out)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in out)
    out = device.place_views(views_cpu(), torch.device("cpu"), channels_last=False)
    assert all(v.is_contiguous() for v in out)  # tune's channels_last=false really changes the input


def test_cpu_views_for_a_cuda_model_are_pinned_and_copied_asynchronously(monkeypatch):
    calls = []

    def pin(self):
        calls.append("pin")
        return self

    def to(self, *args, **kwargs):
        calls.append(("to", str(args[0]), kwargs.get("non_blocking")))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    device.place_views(views_cpu(), torch.device("cuda", 0), channels_last=True)
    assert calls == ["pin", ("to", "cuda:0", True)] * 2


def test_views_already_on_the_device_are_not_copied(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "to", lambda *a, **k: (_ for _ in ()).throw(AssertionError("copied")))
    v = views_cpu()
    out = device.place_views(v, torch.device("cpu"), channels_last=True)
    assert out[0].data_ptr() == v[0].data_ptr()


def test_cudnn_autotunes_unless_deterministic():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled())
    try:
        device.set_cudnn(config.load(None))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        device.set_cudnn(config.load(None, ["train.deterministic=true"]))
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2])


@pytest.mark.gpu
@pytest.mark.slow
def test_resume_is_exact_on_a_gpu_when_deterministic(tiny_imagefolder, tmp_path):
    """The CPU resume test's GPU twin: cuDNN's default backward is not deterministic,
    so the comparison runs with train.deterministic=true (bit-exact is then expected)."""
    from bt_fast import checkpoint
    from bt_fast.cli import main
    from conftest import CONFIGS

    def args(run, steps):
        sets = [f"data.train_dir={tiny_imagefolder / 'train'}", f"train.run_dir={run}",
                f"train.max_steps={steps}", "train.deterministic=true", "data.device=gpu"]
        return ["train", "--config", str(CONFIGS / "smoke.yaml")] + [a for s in sets for a in ("--set", s)]

    assert main(args(tmp_path / "a", 4)) == 0
    assert main(args(tmp_path / "b", 2)) == 0 and main(args(tmp_path / "b", 4)) == 0
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_eval_batches_follow_the_backbone_device():
    """Eval's uint8 batches cross to the backbone's device before normalising (a GPU host
    evaluates on the GPU); the meta device stands in for CUDA here."""
    from bt_fast.eval.features import Prep, module_device

    prep = Prep(config.load(None), torch.device("meta"))
    x = prep(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    assert x.device.type == "meta" and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert module_device(torch.nn.Linear(2, 2, device="meta")).type == "meta"
    assert module_device(torch.nn.ReLU()).type == "cpu"
