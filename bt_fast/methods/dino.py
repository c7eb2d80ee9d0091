"""DINO with a ResNet backbone (Caron et al., ICCV 2021): a student matches a moving-average
teacher's centred, sharpened output on other crops of the same image.

    student:  x_v = head(backbone(crop_v))   for all V crops, one pass per size group  [B, K]
    teacher:  y_i = head_t(backbone_t(crop_i)) for the 2 global crops, no gradient      [B, K]
    loss    = mean over pairs (i, v != i) CE(softmax((y_i - c) / teacher_temp), softmax(x_v / student_temp))
    after the loss:         c <- m c + (1 - m) mean of every y over the GLOBAL batch    (m = 0.9)
    after each applied step k of K:  teacher <- tau_k teacher + (1 - tau_k) student,
                                     tau_k from ``base_momentum`` to 1 on a cosine

Head as main_dino.py's ``DINOHead``: Linear -> GELU -> Linear -> GELU -> Linear to the
bottleneck (BN after the hidden ones if ``use_bn_in_head``), L2-normalise, then a
weight-normalised Linear (no bias) to K outputs whose norm g is fixed at 1 when
``norm_last_layer``. The last layer runs in fp32 (its outputs are cosines that the
teacher divides by 0.04). Teacher temperature: linear from ``warmup_teacher_temp`` to
``teacher_temp`` over ``warmup_teacher_temp_epochs``; the last layer gets no update in
the first ``freeze_last_layer_epochs``. Every student gradient is clipped to norm
``clip_grad`` on its own before the step (main_dino.py ``clip_gradients``; the trainer
does it, after its finite test and, under fp16, on unscaled gradients). The teacher
(``teacher.``) and the centre are run state: in the state dict, restored on resume,
untouched by a skipped step (the trainer's buffer guard and the ``applied`` gate
below). Defaults: main_dino.py and its README's ResNet-50 command (views: the ``dino``
preset).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from bt_fast.backbone import parse_widths
from bt_fast.kernels import dino_batch_center, dino_loss, dino_loss_reference
from bt_fast.methods.base import Method, target_tau
from bt_fast.pipelines.bounds import bounded, check
from bt_fast.pipelines.spec import ViewSpec


@dataclass
class DINOConfig:
    head: str = "2048-2048-256"
    """Head MLP widths (hidden-hidden-bottleneck), dash separated, before the last layer."""
    out_dim: int = bounded(65536, ge=1, le=10_000_000)
    """K, the output size of the weight-normalised last layer."""
    use_bn_in_head: bool = False
    """BatchNorm after each hidden Linear of the head."""
    norm_last_layer: bool = True
    """Fix the last layer's weight norm g at 1 (official default for ResNet-50)."""
    base_momentum: float = bounded(0.996, ge=0, le=1)
    """Teacher moving-average rate at step 0; it rises to 1 on a cosine over the schedule."""
    student_temp: float = bounded(0.1, gt=0, le=100)
    """Student softmax temperature."""
    teacher_temp: float = bounded(0.04, gt=0, le=100)
    """Teacher softmax temperature after the warm-up."""
    warmup_teacher_temp: float = bounded(0.04, gt=0, le=100)
    """Teacher softmax temperature at the start of the warm-up."""
    warmup_teacher_temp_epochs: float = bounded(0.0, ge=0)
    """Epochs of the linear teacher-temperature warm-up."""
    center_momentum: float = bounded(0.9, ge=0, le=1)
    """Moving-average rate of the teacher-output centre."""
    freeze_last_layer_epochs: float = bounded(1.0, ge=0)
    """The last layer gets no update for this many first epochs."""
    clip_grad: float = bounded(3.0, ge=0)
    """Clip each parameter's gradient norm to this separately (main_dino.py ``clip_grad``,
    default 3.0), on the unscaled gradients, before the step; 0: no clipping."""
    views: List[ViewSpec] = field(default_factory=list)
    """The crops DINO trains with when it is ``method.name`` (global first); empty = the
    config's ``views`` (or the ``dino`` preset)."""

    def __post_init__(self):
        check(self)  # each number against the range declared beside it
        parse_widths(self.head, "head")


class DINOHead(nn.Module):
    """MLP to the bottleneck, L2-normalise, weight-normalised Linear to K (no bias)."""

    def __init__(self, in_dim: int, cfg: DINOConfig):
        super().__init__()
        sizes, layers = [in_dim, *parse_widths(cfg.head, "head")], []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:  # hidden layers; the bottleneck Linear is last
                layers += [nn.BatchNorm1d(b)] if cfg.use_bn_in_head else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # main_dino.py: truncated normal, std 0.02; zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight_norm(Linear) by hand: direction v [K, bottleneck] and norm g [K, 1] = 1
        self.last_v = nn.Parameter(nn.Linear(sizes[-1], cfg.out_dim, bias=False).weight.detach().clone())
        self.last_g = nn.Parameter(torch.ones(cfg.out_dim, 1), requires_grad=not cfg.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=1)  # [N, bottleneck]
        with torch.autocast(x.device.type, enabled=False):
            w = self.last_g.float() * F.normalize(self.last_v.float(), dim=1)  # [K, bottleneck]
            return x.float() @ w.T  # [N, K] fp32


class DINO(Method):
    """Student backbone + head; teacher = their moving average; V crops -> (student, teacher) outputs."""

    Config = DINOConfig
    views_preset = "dino"
    n_views = None  # multi-crop: 2 global crops, then any number of local ones

    def __init__(self, model_cfg, cfg: DINOConfig):
        super().__init__(model_cfg, cfg)
        self.head = DINOHead(self.feature_dim, cfg)
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        self.teacher_temp, self.frozen = cfg.warmup_teacher_temp, True
        self.clip_grad = cfg.clip_grad  # the trainer clips (bt_fast.train.clip_gradients)

    def forward(self, views):
        student = list(self.head(self.encode(views)).chunk(len(views)))  # V x [B, K]
        with torch.no_grad():
            glob = views[: self.n_global]
            teacher = list(self.teacher["head"](self.encode(glob, self.teacher["backbone"])).chunk(len(glob)))
        return student, teacher

    def loss(self, outputs, group=None):
        student, teacher = outputs
        c = self.cfg
        loss = dino_loss(student, teacher, self.center, student_temp=c.student_temp,
                         teacher_temp=self.teacher_temp, group=group)
        # the centre moves after the loss, as in main_dino.py (a skipped step's move is undone
        # by the trainer's buffer guard: ``center`` is a buffer)
        with torch.no_grad():
            self.center.lerp_(dino_batch_center(teacher, group).to(self.center.dtype), 1 - c.center_momentum)
        return loss, {}

    def baseline_loss(self, outputs):
        """main_dino.py's DINOLoss: the loss on the gathered batch, then the centre moves."""
        student, teacher = outputs
        loss = dino_loss_reference(student, teacher, self.center, student_temp=self.cfg.student_temp,
                                   teacher_temp=self.teacher_temp)
        with torch.no_grad():
            self.center.lerp_(dino_batch_center(teacher).to(self.center.dtype), 1 - self.cfg.center_momentum)
        return loss

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        c, epoch = self.cfg, step / max(1, steps_per_epoch)
        ramp = min(1.0, epoch / c.warmup_teacher_temp_epochs) if c.warmup_teacher_temp_epochs > 0 else 1.0
        self.teacher_temp = c.warmup_teacher_temp + ramp * (c.teacher_temp - c.warmup_teacher_temp)
        self.frozen = epoch < c.freeze_last_layer_epochs

    def drop_frozen_grads(self) -> None:
        if self.frozen:
            self.head.last_v.grad = self.head.last_g.grad = None

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher parameters, the student parameters they follow), in matching order."""
        return ([*self.teacher["backbone"].parameters(), *self.teacher["head"].parameters()],
                [*self.backbone.parameters(), *self.head.parameters()])

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """teacher <- teacher + w (student - teacher), w = (1 - tau_k) on applied steps, 0 on
        skipped ones (a device bool: no sync); one fused foreach lerp."""
        teacher, student = self.momentum_pairs()
        w = applied.to(torch.float32) * (1.0 - target_tau(self.cfg.base_momentum, step, total_steps))
        torch._foreach_lerp_(teacher, student, w)
