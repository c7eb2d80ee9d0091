"""What a method is to the trainer: the seam between bt_fast and an SSL method.

A method is an ``nn.Module`` that owns ``backbone`` (state-dict prefix ``backbone.``:
what evaluation and export load) and its heads, and provides

- ``forward(views) -> outputs``: the list of augmented views [B, 3, H, W] to whatever
  its loss needs (run under autocast, through DDP);
- ``loss(outputs, group) -> (loss, terms)``: an fp32 scalar over the GLOBAL batch of
  ``group`` (losses live in ``bt_fast.kernels``) and a dict of named fp32 scalars that
  metrics, dashboards and ``bt-fast report`` show (``terms`` below names them);
- ``after_step(step, total_steps, applied)``: state updates after the optimizer step,
  ``applied`` a 0-d bool on the device (False when the step was skipped); a no-op
  except for BYOL's moving-average target.

Its hyper-parameters are a dataclass ``Config`` declared next to the class; it becomes
the ``method.<name>`` section of the run config, defaults included.
"""

from __future__ import annotations

import torch
from torch import nn

from bt_fast.backbone import build_backbone, build_mlp, parse_widths


def check_heads(projector: str, impl: str | None = None, impls: tuple = ()) -> None:
    """A method Config's shared checks: dash-separated head widths, and a loss ``impl``
    among ``impls``; ValueError (the config loader names the section and key)."""
    parse_widths(projector, "projector")
    if impl is not None and impl not in impls:
        raise ValueError(f"impl={impl!r}: choose one of {', '.join(impls)}")


class Method(nn.Module):
    """Base class: the backbone, the hooks' defaults and the class-level metadata."""

    Config: type
    """The method's hyper-parameter dataclass (the ``method.<name>`` config section)."""
    n_views: int = 2
    """How many views per image the loss consumes (the trainer checks ``views``)."""
    views_preset: str
    """bt_fast.pipelines.presets name: the views of a config that leaves them to the method."""
    terms: dict = {}
    """Loss-term name -> plot label (paper notation), in the order ``loss`` returns them."""
    crosscorr: bool = False
    """``bt-fast report`` draws the two views' cross-correlation heatmap (what the loss is about)."""

    def __init__(self, model_cfg, cfg=None):
        super().__init__()
        self.cfg = cfg  # the method's Config (its ``method.<name>`` section)
        self.backbone, self.feature_dim = build_backbone(model_cfg)

    def mlp(self, widths: str, in_dim: int | None = None, **kwargs) -> nn.Sequential:
        """A head of dash-separated ``widths`` (the Config validated them) on ``in_dim``
        inputs, the backbone's features by default; ``kwargs`` as backbone.build_mlp."""
        return build_mlp(self.feature_dim if in_dim is None else in_dim, parse_widths(widths, "widths"), **kwargs)

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The default: ``[projector(backbone(v)) for v in views]``, each [B, D].

        One backbone pass per view: same-size views could be concatenated, but separate
        passes keep BatchNorm statistics per view, as the official codes do.
        """
        return [self.projector(self.backbone(v)) for v in views]

    def loss(self, outputs, group=None) -> tuple[torch.Tensor, dict]:
        """(fp32 loss over the global batch of ``group``, {term: fp32 scalar}); abstract."""
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """Called once per optimizer step, after it; ``applied`` is False if it was skipped."""

    def baseline_loss(self, outputs) -> torch.Tensor:
        """The loss as the method's official code computes it (``bench step``'s baseline)."""
        return self.loss(outputs, None)[0]
