"""bt-fast doctor on a CPU-only machine: the CPU twins, every SKIP path, the exit code,
the on-paper table, and the torch >= 2.5 floor (no newer API used unguarded)."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

from bt_fast import config, optim
from bt_fast.cli import main
from bt_fast.doctor import compat, correctness, environment, paper, pipeline_check, speed
from bt_fast.doctor.environment import Host
from bt_fast.doctor.report import FAIL, PASS, SKIP, Check, Report, run_check

REPO = Path(__file__).resolve().parent.parent
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def recipe():
    return config.load(REPO / "configs/imagenet.yaml")


@pytest.mark.gpu
def test_doctor_passes_on_this_gpu(capsys):
    """Where a GPU is: the whole quick doctor, every line PASS or SKIP (never run yet)."""
    code = main(["doctor", "--json", "--quick"])
    report = json.loads(capsys.readouterr().out)
    fails = [c for part in report["parts"].values() for c in part if c["status"] == FAIL]
    assert code == 0 and not fails, fails


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path; test_doctor_passes_on_this_gpu covers GPUs")
def test_json_quick_prints_a_complete_report(capsys):
    assert main(["doctor", "--json", "--quick"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {part: [c["name"] for c in checks] for part, checks in report["parts"].items()}
    assert set(names) == {"environment", "correctness", "speed"}
    for want in ("torch", "cuda", "cudnn", "nccl", "triton", "dali", "apex", "gpu", "incompatibilities"):
        assert want in names["environment"]
    for want in ("loss.dense [interpreter]", "loss.gram [interpreter]", "colnorm [interpreter]",
                 "dali.gpu_vs_cpu", "train_steps [cpu twin]", "nccl.distributed_loss"):
        assert want in names["correctness"]
    assert "speedup_over_plain_loop" in checks_data(report, "step_images_per_s")
    for want in ("step_images_per_s", "loss_ms", "pipeline_images_per_s", "data_wait_share", "verdict"):
        assert want in names["speed"]
    checks = {c["name"]: c for part in report["parts"].values() for c in part}
    assert all(c["status"] in (PASS, FAIL, SKIP) and c["detail"] for c in checks.values())
    # no GPU: one line says so, the CPU twins pass, speed skips, exit 0
    assert checks["gpu"]["status"] == SKIP and "no GPU" in checks["gpu"]["detail"]
    for name in ("loss.dense [interpreter]", "loss.gram [interpreter]", "colnorm [interpreter]",
                 "train_steps [cpu twin]"):
        assert checks[name]["status"] == PASS, checks[name]
    assert all(c["status"] == SKIP for c in report["parts"]["speed"])
    assert report["summary"]["FAIL"] == 0 and report["exit_code"] == 0
    losses = checks["train_steps [cpu twin]"]["data"]["losses"]
    assert losses[-1] < losses[0]


def test_missing_dali_skips_the_pipeline_parts(monkeypatch, recipe):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    version, why = environment.dali_version()
    assert version == "" and "DALI not importable" in why
    host = Host(gpus=1, gpu_name=H100, dali=version, dali_why=why)  # a GPU host without DALI
    dali_line = next(c for c in environment.versions(host) if c.name == "dali")
    assert dali_line.status == SKIP and "synthetic tensors" in dali_line.detail
    lines = (pipeline_check.gpu_vs_cpu(host, True) + [pipeline_check.pipeline_speed(host, True, 2),
                                                       pipeline_check.data_wait(host, recipe, True, 2)])
    assert len(lines) == 4
    assert all(c.status == SKIP and "DALI not importable" in c.detail for c in lines)
    assert environment.jpeg_hw_decoder(host, (9, 0)).status == SKIP


def test_one_gpu_skips_nccl_and_no_gpu_skips_speed(recipe):
    one = Host(gpus=1, gpu_name=H100, dali="2.4.0")
    check = correctness.distributed_loss(one, quick=True)
    assert check.status == SKIP and "needs 2" in check.detail
    none = Host(gpus=0, dali="2.4.0")
    (gpu_line,) = environment.gpu(none)
    assert gpu_line.status == SKIP and gpu_line.detail.startswith("no GPU")
    assert speed.loss_speed(none, True).status == SKIP
    assert all(c.status == SKIP for c in pipeline_check.gpu_vs_cpu(none, True))
    assert speed.verdict(none, recipe, Check("step_images_per_s", SKIP, "x")).status == SKIP


def test_verdict_against_the_paper(recipe):
    host = Host(gpus=1, gpu_name=H100, dali="2.4.0", bf16=True)
    expected = paper.expected_images_per_s(H100)

    def step(rate):
        return Check("step_images_per_s", PASS, "", {"images_per_s": rate, "precision": "bf16"})

    assert speed.verdict(host, recipe, step(0.9 * expected)).status == PASS
    low = speed.verdict(host, recipe, step(0.3 * expected))
    assert low.status == FAIL and "30 %" in low.detail
    odd = Host(gpus=1, gpu_name="Some Future GPU", dali="2.4.0", bf16=True)
    assert speed.verdict(odd, recipe, step(1000.0)).status == SKIP


def test_a_failing_or_crashing_check_makes_the_exit_code_nonzero(monkeypatch, capsys):
    import bt_fast.doctor as doctor

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    (crash,) = run_check("colnorm", boom)
    assert crash.status == FAIL and "RuntimeError: kernel exploded" in crash.detail
    assert "test_doctor.py:" in crash.detail  # where it broke
    monkeypatch.setattr(doctor, "correctness_part", lambda *a: run_check("colnorm", boom))
    monkeypatch.setattr(doctor, "speed_part", lambda *a: [])
    assert main(["doctor", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  colnorm" in out and "1 fail" in out
    report = Report()
    report.add("speed", [Check("x", SKIP, "y")])
    assert report.exit_code() == 0


def test_incompatibilities(monkeypatch):
    host = Host(gpus=0, dali="1.44.0")
    check = compat.incompatibilities(host, "bf16")
    assert check.status == PASS and any("zero-copy" in n for n in check.data["notes"])
    check = compat.incompatibilities(Host(gpus=0, dali=""), "bf16")
    assert check.status == PASS and any("cannot read images" in n for n in check.data["notes"])
    monkeypatch.setattr(compat, "_torch_wants_triton", lambda: "9.9.0")
    check = compat.incompatibilities(Host(gpus=0), "bf16")
    assert check.status == FAIL and "triton" in check.detail


def test_dali_graph_cpu_twin(tmp_path):
    """The decode + resize graph the GPU check runs, here CPU against CPU: identical."""
    pytest.importorskip("nvidia.dali")
    root = pipeline_check._jpegs(str(tmp_path), 16)
    diff = pipeline_check.compare_graphs(root, ("cpu", "cpu"), batch=8, batches=2)
    assert diff == {"mean_abs": 0.0, "channel_mean": 0.0, "images": 16}


@pytest.mark.slow
def test_distributed_loss_gloo_twin():
    """The NCCL check's code over gloo on 2 CPU processes."""
    check = correctness.distributed_loss(Host(gpus=0), quick=True, backend="gloo")
    assert check.status == PASS, check.detail
    assert check.name == "gloo.distributed_loss" and len(check.data["ranks"]) == 2


def test_paper_table_is_what_docs_quote():
    """One source of truth: docs/gpu.md embeds paper.markdown() verbatim."""
    doc = (REPO / "docs/gpu.md").read_text()
    assert paper.markdown() in doc
    assert 0.034 < paper.projector_gmac() / paper.RESNET50_GMAC < 0.038  # "~3.6 % of forward"
    assert paper.peak_tflops("NVIDIA H100 PCIe") == 756.0 and paper.peak_tflops(H100) == 989.0


# ---------------------------------------------------------------- the torch floor

GUARD_ERRORS = {"AttributeError", "ImportError", "ModuleNotFoundError", "Exception"}


def _aliases(tree) -> dict:
    """Local name -> dotted torch module/attribute it stands for."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("torch"):
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node, aliases):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return ".".join([aliases[node.id]] + parts[::-1])
    return None


def _guarded(parents) -> bool:
    for p in parents:
        if isinstance(p, ast.Try):
            caught = {getattr(h.type, "id", None) for h in p.handlers} | {
                getattr(e, "id", None) for h in p.handlers if isinstance(h.type, ast.Tuple) for e in h.type.elts}
            if caught & GUARD_ERRORS:
                return True
        if isinstance(p, ast.If) and "hasattr" in ast.unparse(p.test):
            return True
    return False


def unguarded_newer_names(source: str) -> list[str]:
    tree, found = ast.parse(source), []
    aliases = _aliases(tree)

    def visit(node, parents):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            for a in node.names:  # the import itself fails on an older torch
                name = f"{node.module}.{a.name}"
                hit = next((n for n in compat.NEWER_THAN_FLOOR if name == n or name.startswith(n + ".")), None)
                if hit and not _guarded(parents):
                    found.append(f"line {node.lineno}: {hit} (torch {compat.NEWER_THAN_FLOOR[hit]})")
        if isinstance(node, (ast.Attribute, ast.Name)):
            name = _dotted(node, aliases) if isinstance(node, ast.Attribute) else aliases.get(node.id)
            hit = name and next((n for n in compat.NEWER_THAN_FLOOR if name == n or name.startswith(n + ".")), None)
            if hit and not _guarded(parents):
                found.append(f"line {node.lineno}: {hit} (torch {compat.NEWER_THAN_FLOOR[hit]})")
            if isinstance(node, ast.Attribute):
                return  # the chain is one name
        for child in ast.iter_child_nodes(node):
            visit(child, parents + [node])

    visit(tree, [])
    return found


def test_the_checker_flags_unguarded_and_accepts_guarded_uses():
    assert unguarded_newer_names("import torch\nn = torch.nn.utils.get_total_norm(ps)\n")
    assert unguarded_newer_names("from torch import accelerator\naccelerator.synchronize()\n")
    assert unguarded_newer_names("from torch.nn.utils import get_total_norm\n")
    assert not unguarded_newer_names("try:\n    from torch.nn.utils import get_total_norm\nexcept ImportError:\n    pass\n")
    assert unguarded_newer_names("import torch.backends.cuda as b\nb.matmul.fp32_precision = 'tf32'\n")
    assert not unguarded_newer_names(
        "import torch\ntry:\n    a = torch.accelerator.current_accelerator()\nexcept AttributeError:\n    a = None\n")
    assert not unguarded_newer_names("import torch\nif hasattr(torch, 'accelerator'):\n    torch.accelerator.x()\n")
    assert not unguarded_newer_names("import torch\nx = getattr(torch, 'accelerator', None)\n")


def test_no_newer_torch_api_unguarded_in_the_package():
    files = sorted((REPO / "bt_fast").rglob("*.py")) + sorted((REPO / "kernels").glob("*.py")) + sorted(
        (REPO / "pipelines").glob("*.py"))
    assert len(files) > 30
    problems = [f"{f.relative_to(REPO)} {hit}" for f in files for hit in unguarded_newer_names(f.read_text())]
    assert not problems, "torch >= 2.5 must work; guard these:\n" + "\n".join(problems)


def test_doctor_and_train_step_run_with_newer_names_missing(monkeypatch, recipe):
    """Fake an older torch: remove names newer than the floor; optim and the train step run."""
    from bt_fast.bench.step import contender, contender_step

    run, views = contender(correctness.tiny_twin(recipe), 4, torch.device("cpu"))  # torch's own imports first
    monkeypatch.delattr(torch, "accelerator", raising=False)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    monkeypatch.delattr(torch.nn.utils, "clip_grads_with_norm_", raising=False)
    monkeypatch.delattr(torch.compiler, "set_stance", raising=False)
    run.optimizer = optim.build(run.model, recipe.optim)
    losses = [contender_step(run, views).item() for _ in range(2)]
    assert all(map(lambda x: x == x, losses))
    assert environment.probe().gpus == 0


def test_eval_autocast_follows_the_backbone_device(monkeypatch):
    """Evaluation autocasts where the weights are (CUDA on a GPU host), not always on the CPU."""
    from bt_fast.eval import features

    seen = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: seen.append((device_type, kw["enabled"])))
    cpu = torch.nn.Linear(2, 2)
    features.autocast_for(cpu, True)

    class OnCuda(torch.nn.Module):  # placement faked: this machine has no GPU
        def parameters(self, recurse=True):
            yield torch.empty(0, device="meta").as_subclass(_CudaTensor)

    features.autocast_for(OnCuda(), False)
    assert seen == [("cpu", True), ("cuda", False)]


class _CudaTensor(torch.Tensor):
    @property
    def device(self):
        return torch.device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what happens without a driver")
def test_jpeg_hw_probe_without_a_driver():
    """The nvJPEG probe's ctypes calls run here; with no driver they say so rather than guess."""
    check = environment.jpeg_hw_decoder(Host(gpus=1, gpu_name=H100, dali="2.4.0"), (9, 0))
    if environment._nvjpeg() is None:  # no libnvjpeg: judged from the model (H100 has NVJPG)
        assert check.status == PASS and check.data["present"]
    else:
        assert check.status == SKIP and "does not initialise" in check.detail


def checks_data(report: dict, name: str) -> dict:
    return next(c["data"] for part in report["parts"].values() for c in part if c["name"] == name)
