"""What a method is to the trainer: the seam between bt_fast and an SSL method.

A method is an ``nn.Module`` that owns ``backbone`` (state-dict prefix ``backbone.``:
what evaluation and export load) and its heads, and provides

- ``forward(views) -> outputs``: the list of augmented views [B, 3, H, W] to whatever
  its loss needs (run under autocast, through DDP);
- ``loss(outputs, group) -> (loss, terms)``: an fp32 scalar over the GLOBAL batch of
  ``group`` (losses live in ``bt_fast.kernels``) and a dict of named fp32 scalars that
  metrics, dashboards and ``bt-fast report`` show (``terms`` below names them);
- ``after_step(step, total_steps, applied)``: state updates after the optimizer step,
  ``applied`` a 0-d bool on the device (False when the step was skipped): BYOL's and
  DINO's moving-average targets, SwAV's prototype normalisation;
- ``start_step(step, steps_per_epoch)`` before forward and ``drop_frozen_grads()``
  after backward: host-side schedules of the multi-crop methods (DINO's teacher
  temperature; SwAV's prototypes and DINO's last layer frozen early on), no-ops otherwise;
- ``rank_state()`` / ``load_rank_state(state, device)``: run state that differs per rank
  and so stays out of the (replicated) state dict: SwAV's queue. Checkpoints store one
  entry per rank; None (the default) means none.

Views: a method takes either exactly ``n_views`` views (the two-view methods), or, with
``n_views = None``, ``n_global`` global crops of one size first and any number of
local crops after them (multi-crop); ``check_views`` says which views fit.

Its hyper-parameters are a dataclass ``Config`` declared next to the class; it becomes
the ``method.<name>`` section of the run config, defaults included.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bt_fast.backbone import build_backbone, build_mlp, parse_widths


def check_heads(projector: str, impl: str | None = None, impls: tuple = ()) -> None:
    """A method Config's shared checks: dash-separated head widths, and a loss ``impl``
    among ``impls``; ValueError (the config loader names the section and key)."""
    parse_widths(projector, "projector")
    if impl is not None and impl not in impls:
        raise ValueError(f"impl={impl!r}: choose one of {', '.join(impls)}")


def target_tau(base_tau: float, step: int, total_steps: int) -> float:
    """A moving-average target's rate (BYOL's τ, DINO's teacher momentum) at step k of K:
    τ_k = 1 - (1 - τ_base)(cos(π k / K) + 1) / 2, τ_base at k = 0, 1 at k = K."""
    return 1 - (1 - base_tau) * (math.cos(math.pi * min(step, total_steps) / max(1, total_steps)) + 1) / 2


class Method(nn.Module):
    """Base class: the backbone, the hooks' defaults and the class-level metadata."""

    Config: type
    """The method's hyper-parameter dataclass (the ``method.<name>`` config section)."""
    n_views: int | None = 2
    """How many views per image the loss consumes (``config.validate`` checks ``views``);
    None: multi-crop, ``n_global`` global crops then any number of local ones."""
    n_global: int = 2
    """Multi-crop: how many of the views (the first ones, all one size) are global crops."""
    views_preset: str
    """bt_fast.pipelines.presets name: the views of a config that leaves them to the method."""
    terms: dict = {}
    """Loss-term name -> plot label (paper notation), in the order ``loss`` returns them."""
    crosscorr: bool = False
    """``bt-fast report`` draws the two views' cross-correlation heatmap (what the loss is about)."""
    clip_grad: float = 0.0
    """Per-parameter gradient-norm clip the trainer applies before the step (DINO's
    ``clip_grad``, bt_fast.optim.clip_per_parameter); 0: none."""

    def __init__(self, model_cfg, cfg=None):
        super().__init__()
        self.cfg = cfg  # the method's Config (its ``method.<name>`` section)
        self.backbone, self.feature_dim = build_backbone(model_cfg)

    def mlp(self, widths: str, in_dim: int | None = None, **kwargs) -> nn.Sequential:
        """A head of dash-separated ``widths`` (the Config validated them) on ``in_dim``
        inputs, the backbone's features by default; ``kwargs`` as backbone.build_mlp."""
        return build_mlp(self.feature_dim if in_dim is None else in_dim, parse_widths(widths, "widths"), **kwargs)

    @classmethod
    def check_views(cls, sizes: list[int]) -> str | None:
        """Why views of these sides (one per crop, in order) do not fit the method; None if they do."""
        if cls.n_views is not None:
            if len(sizes) != cls.n_views:
                return f"{cls.__name__} needs exactly {cls.n_views} views, got {len(sizes)}"
            return None
        if len(sizes) < cls.n_global or len(set(sizes[: cls.n_global])) != 1:
            return (f"{cls.__name__} needs its {cls.n_global} global crops first, all one size, then "
                    f"any local crops; got sizes {sizes}")
        return None

    def encode(self, views: list[torch.Tensor], backbone: nn.Module | None = None) -> torch.Tensor:
        """Backbone features of every view, [V * B, F] in view order: one pass per run of
        consecutive same-size views (concatenated, as the official SwAV and DINO codes
        do: BatchNorm then sees those crops as one batch)."""
        backbone = self.backbone if backbone is None else backbone
        feats, start = [], 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            # torch.cat keeps channels-last when every view has it (place_views' format)
            feats.append(backbone(torch.cat(views[start:end]) if end - start > 1 else views[start]))
            start = end
        return torch.cat(feats) if len(feats) > 1 else feats[0]

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

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        """Called before each step's forward (host values only: no sync)."""

    def drop_frozen_grads(self) -> None:
        """Called after backward: set the gradients of parameters frozen at this step to
        None, so that LARS skips them entirely (no weight decay, no momentum), as the
        official codes do."""

    def rank_state(self) -> dict | None:
        """This rank's own run state for the checkpoint (CPU tensors); None: the method has none."""
        return None

    def load_rank_state(self, state: dict | None, device) -> str | None:
        """Restore ``rank_state``'s dict (None when the checkpoint has none); a warning line
        where it does not fit this config (the state then starts afresh), else None."""
        return None

    def baseline_loss(self, outputs) -> torch.Tensor:
        """The loss as the method's official code computes it (``bench step``'s baseline)."""
        return self.loss(outputs, None)[0]
