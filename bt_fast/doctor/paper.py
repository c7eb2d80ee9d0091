"""Throughput on paper: the one place its numbers live (docs/gpu.md quotes ``markdown()``).

Every constant carries its source; everything else is arithmetic on them. ``bt-fast
doctor`` compares what it measures with ``expected_images_per_s(gpu_name)``.

    python -m bt_fast.doctor.paper      # prints the table docs/gpu.md embeds
"""

from __future__ import annotations

from bt_fast.kernels import loss_costs

# ---------------------------------------------------------------- sourced constants
RESNET50_GMAC = 4.09
"""Forward multiply-adds per 224-px image (torchvision ResNet50_Weights docs: "GFLOPS 4.09",
which counts MACs). Training ~3x forward (backward = 2x forward), the usual rule."""
TRAIN_OVER_FORWARD = 3
BACKBONE_FEATURES = 2048
PROJECTOR = (8192, 8192, 8192)
"""Official recipe (facebookresearch/barlowtwins main.py, --projector 8192-8192-8192)."""
IMAGENET_TRAIN_IMAGES = 1_281_167
"""ILSVRC-2012 train split."""
BATCH = 2048
"""Official global batch."""
DLE_A100_AMP_IMG_S = 2470
"""NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5 README,
"Training performance: NVIDIA DGX A100 (8x A100 80GB)", 1 GPU, mixed precision (21.03 container)."""
MLPERF_H100_IMG_S = 6900
"""MLPerf Training, ResNet-50 closed division, 8x H100 systems with DALI: ~6.9k img/s per GPU
(figure from issue 14; not re-read from the MLCommons results table here)."""
A100_HW_JPEG_IMG_S = (5000, 7000)
"""A100 hardware JPEG decoder on ImageNet-sized JPEGs (NVIDIA developer blog "Loading Data
Fast with DALI and the New Hardware JPEG Decoder in NVIDIA A100 GPUs"; range from issue 14)."""
CPU_MS_DECODE_2CROPS = 3.6
"""CPU-ms per image for DALI decode + two random-resized 224-px crops (bench pipeline, measured on
this project's CPU machines: 3.4-3.8 ms)."""

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets. Matched
# against torch.cuda.get_device_name() in order: the first substring found wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0), ("H200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A30", 165.0), ("A10", 125.0), ("L40S", 362.0),
    ("L4", 121.0),
)
VERDICT_MIN_FRACTION = 0.4
"""Below 40 % of the on-paper rate the doctor FAILs: eager PyTorch is expected somewhat
below MLPerf-tuned code, not 2.5x below."""


# ---------------------------------------------------------------- arithmetic
def projector_gmac() -> float:
    dims = (BACKBONE_FEATURES,) + PROJECTOR
    return sum(a * b for a, b in zip(dims, dims[1:])) / 1e9


def train_flops_per_image(views: int = 2) -> float:
    """Backbone + projector, forward + backward, for all views of one image (2 flop/MAC)."""
    return views * TRAIN_OVER_FORWARD * 2 * (RESNET50_GMAC + projector_gmac()) * 1e9


def loss_tflop(impl: str, n: int = BATCH, d: int = PROJECTOR[-1]) -> float:
    """Forward + backward flops of the loss at one process (kernels/cost.py's model)."""
    return loss_costs(n, d, 1, "bfloat16", "cuda")[impl].flops / 1e12


def reference_mfu() -> dict:
    """Share of bf16 peak the published ResNet-50 classifier runs reach (1 view per image)."""
    flops = train_flops_per_image(views=1) - 2 * TRAIN_OVER_FORWARD * projector_gmac() * 1e9
    return {"dle_a100": DLE_A100_AMP_IMG_S * flops / (peak_tflops("A100") * 1e12),
            "mlperf_h100": MLPERF_H100_IMG_S * flops / (peak_tflops("H100") * 1e12)}


def peak_tflops(gpu_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in gpu_name:
            return tflops
    return None


def expected_images_per_s(gpu_name: str) -> float | None:
    """bt_fast images/s per GPU on paper: the MLPerf share of peak, at bt_fast's flops/image."""
    peak = peak_tflops(gpu_name)
    if peak is None:
        return None
    return reference_mfu()["mlperf_h100"] * peak * 1e12 / train_flops_per_image()


def epochs_hours(gpus: int, epochs: int = 1000, gpu_name: str = "H100") -> float:
    return IMAGENET_TRAIN_IMAGES * epochs / (gpus * expected_images_per_s(gpu_name)) / 3600


def ddp_seconds_per_step(gpus: int, link_gb_s: float = 50.0, params_m: float = 174.5) -> float:
    """Ring all-reduce of fp32 gradients: 2 (W-1)/W x 4 bytes x params, per GPU, over its link."""
    return 2 * (gpus - 1) / gpus * 4 * params_m * 1e6 / (link_gb_s * 1e9)


def rows() -> list[tuple[str, str, str]]:
    """(quantity, value, source) for the table in docs/gpu.md."""
    fwd = RESNET50_GMAC + projector_gmac()
    img = expected_images_per_s("H100")
    mfu = reference_mfu()
    step_tflop = BATCH * train_flops_per_image() / 1e12
    return [
        ("ResNet-50 forward, one 224-px view", f"{RESNET50_GMAC:.2f} GMAC", "torchvision ResNet50_Weights docs"),
        ("projector 2048-8192-8192-8192 forward", f"{projector_gmac():.3f} GMAC "
         f"({100 * projector_gmac() / fwd:.1f} % of the forward)", "arithmetic: sum of in x out"),
        ("training flops per image (2 views, x3 for backward)", f"{train_flops_per_image() / 1e9:.1f} GFLOP",
         "arithmetic, 2 flop per MAC"),
        ("one step at batch 2048 (model only)", f"{step_tflop:.0f} TFLOP", "arithmetic"),
        ("loss fwd+bwd, N=2048, D=8192: gram / dense / reference",
         f"{loss_tflop('gram'):.2f} / {loss_tflop('dense'):.2f} / {loss_tflop('reference'):.2f} TFLOP "
         f"({100 * loss_tflop('gram') / step_tflop:.2f} / {100 * loss_tflop('dense') / step_tflop:.1f} "
         f"/ {100 * loss_tflop('reference') / step_tflop:.1f} % of the step)", "kernels/cost.py"),
        ("ResNet-50 training, 1x A100-80GB, AMP", f"{DLE_A100_AMP_IMG_S:,} img/s = "
         f"{100 * mfu['dle_a100']:.1f} % of 312 TFLOP/s", "NVIDIA DeepLearningExamples, resnet50v1.5 README"),
        ("ResNet-50 training, 8x H100, DALI", f"~{MLPERF_H100_IMG_S:,} img/s per GPU = "
         f"{100 * mfu['mlperf_h100']:.1f} % of 989 TFLOP/s", "MLPerf Training, ResNet-50 closed (via issue 14)"),
        ("nvJPEG hardware decoder, A100, ImageNet JPEGs", f"~{A100_HW_JPEG_IMG_S[0]:,}-{A100_HW_JPEG_IMG_S[1]:,} img/s",
         "NVIDIA developer blog on DALI and the A100 JPEG decoder (via issue 14)"),
        ("bt_fast per H100 at the MLPerf share of peak", f"{img:,.0f} img/s = {2 * img:,.0f} views/s",
         "arithmetic on the two lines above"),
        ("JPEG decodes needed per H100 (decode once, crop twice)", f"{img:,.0f} /s "
         f"(within one A100-class hardware decoder)", "arithmetic"),
        ("CPU threads per H100 if decoding on the CPU", f"~{img * CPU_MS_DECODE_2CROPS / 1e3:.0f} "
         f"(decode + 2 crops alone, {CPU_MS_DECODE_2CROPS} CPU-ms/img)", "bench pipeline, measured on CPU"),
        ("1000 ImageNet epochs, 8 / 32 H100 (linear scaling)",
         f"{epochs_hours(8):.1f} h / {epochs_hours(32):.1f} h", "arithmetic"),
        ("DDP all-reduce of fp32 grads (174.5 M params), 8 GPUs NVLink 450 GB/s / "
         "32 GPUs at 50 GB/s per GPU", f"{1e3 * ddp_seconds_per_step(8, 450):.1f} ms / "
         f"{1e3 * ddp_seconds_per_step(32, 50):.0f} ms per step vs "
         f"{1e3 * BATCH / 8 / img:.0f} / {1e3 * BATCH / 32 / img:.0f} ms of compute", "arithmetic, ring all-reduce"),
    ]


def markdown() -> str:
    lines = ["| quantity | on paper | source |", "|---|---|---|"]
    lines += [f"| {q} | {v} | {s} |" for q, v, s in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
