"""``bt-fast export CHECKPOINT --out PATH``: the pretrained backbone for use elsewhere.

Writes a plain state dict of the backbone (no ``backbone.`` / ``module.`` prefixes, no
``fc``: the classifier was never trained, as in the official Barlow Twins release) and,
beside it, ``PATH.yaml``: the model config and the lines that rebuild the net.

Standard widths load into torchvision directly::

    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    net.load_state_dict(torch.load("resnet50_bt.pt"))

Narrow (``model.width`` != 64) or small-stem nets are not torchvision's constructors;
``PATH.yaml`` names the bt_fast call that rebuilds them. ``--format safetensors``
writes the same tensors with the safetensors package, when it is importable.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from bt_fast import safeio
from bt_fast.errors import UsageError
from bt_fast.eval.features import load_backbone

FORMATS = ("pt", "safetensors")


def is_torchvision_layout(model_cfg) -> bool:
    """True when ``torchvision.models.<backbone>()`` has exactly these tensors (minus fc)."""
    return model_cfg.width == 64 and not model_cfg.small_stem


def rebuild_recipe(model_cfg, weights: str) -> str:
    """The few lines of Python that rebuild the exported net and load ``weights``."""
    load = "torch.load(weights)" if weights.endswith(".pt") else "safetensors.torch.load_file(weights)"
    if is_torchvision_layout(model_cfg):
        ctor = f"net = torchvision.models.{model_cfg.backbone}()\nnet.fc = torch.nn.Identity()"
    else:
        ctor = ("from bt_fast.config import ModelConfig\nfrom bt_fast.backbone import build_backbone\n"
                f"net, _ = build_backbone(ModelConfig(backbone={model_cfg.backbone!r}, "
                f"width={model_cfg.width}, small_stem={model_cfg.small_stem}))")
    return f"{ctor}\nweights = {weights!r}\nnet.load_state_dict({load})\n"


def backbone_state(checkpoint: str | Path) -> tuple[dict, object, dict]:
    """(state dict, model config, provenance) of a checkpoint's backbone, on the CPU."""
    loaded = load_backbone(checkpoint)
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.backbone.state_dict().items()
             if not k.startswith("fc.")}
    provenance = {"checkpoint": str(checkpoint), "step": loaded.step, "feature_dim": loaded.feature_dim}
    return state, loaded.cfg.model, provenance


def export(checkpoint: str | Path, out: str | Path, fmt: str = "pt") -> Path:
    """Write the backbone weights to ``out`` and its rebuild notes to ``out.yaml``."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out, notes_path = Path(out), Path(f"{out}.yaml")
    for target in (out, notes_path):  # refused before the checkpoint is even read
        safeio.check_target(target, inputs=[checkpoint])
    state, model_cfg, provenance = backbone_state(checkpoint)
    if fmt == "safetensors":
        try:
            from safetensors.torch import save as to_bytes  # optional dependency
        except ImportError:
            raise UsageError("--format safetensors needs the safetensors package "
                             "(pip install safetensors); --format pt needs nothing") from None
        safeio.write_atomic(out, to_bytes(state, metadata={"source": provenance["checkpoint"]}),
                            inputs=[checkpoint])
    else:
        safeio.write_atomic(out, lambda f: torch.save(state, f), inputs=[checkpoint])
    notes = {"model": {"backbone": model_cfg.backbone, "width": model_cfg.width,
                       "small_stem": model_cfg.small_stem},
             "torchvision_layout": is_torchvision_layout(model_cfg), **provenance,
             "rebuild": rebuild_recipe(model_cfg, out.name)}
    safeio.write_atomic(notes_path, yaml.safe_dump(notes, sort_keys=False), inputs=[checkpoint])
    return out


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a bt_fast checkpoint (e.g. runs/fmnist/checkpoints/last.pt)")
    parser.add_argument("--out", required=True, help="where to write the backbone weights")
    parser.add_argument("--format", default="pt", choices=FORMATS,
                        help="pt: torch.save of a state dict; safetensors: needs the package")


def run(args) -> int:
    out = export(args.checkpoint, args.out, args.format)
    print(f"{out}: backbone weights; rebuild with the lines in {out}.yaml")
    return 0
