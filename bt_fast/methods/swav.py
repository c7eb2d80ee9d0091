"""SwAV (Caron et al., NeurIPS 2020): predict the cluster codes of one crop from another.

    f      = backbone(crops), one pass per size group               [V B, F]
    z      = normalize(projector(f))                                [V B, D] unit rows
    s_v    = z_v C^T, C the K prototypes, unit rows                 [B, K] per crop (fp32)
    q_i    = SinkhornKnopp(s_i) over the GLOBAL batch, global crops i only, no gradient
    loss   = mean_i mean_{v != i} CE(q_i, softmax(s_v / temperature))   (bt_fast.kernels.swav_loss)

Prototypes are re-normalised after every step (and at construction) and get no update
for the first ``freeze_prototypes_steps`` steps, as in facebookresearch/swav
main_swav.py. Projector as there: Linear -> BN -> ReLU -> Linear, with biases. Defaults:
the 800-epoch recipe (scripts/swav_800ep_pretrain.sh); the views are the ``multicrop``
preset (2 x 224 + 6 x 96) unless ``views`` names others.

The queue for small batches (main_swav.py ``queue``; its batch-256 recipes use 3840 rows
from epoch 15): each rank keeps, per global crop, its last L = queue_length / W unit
embeddings z (detached, fp32, newest first). From step ``queue_start_steps`` every
applied step pushes the step's global-crop embeddings in and the oldest out (FIFO);
once full, its scores against the current prototypes join that crop's Sinkhorn-Knopp
(``swav_loss(queue_scores=...)``) and only the batch rows' codes are targets. The queue
is per-rank run state outside the state dict (``rank_state``: DDP would otherwise
broadcast rank 0's copy, and checkpoints store rank 0's state dict only), restored on
resume and untouched by a skipped step. A queue is used only once full (as main_swav.py:
its zero rows would be samples too): while it fills (queue_length / batch_size steps)
each step reads one device flag on the host, none after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from bt_fast.backbone import parse_widths
from bt_fast.kernels import collectives, swav_loss, swav_loss_reference
from bt_fast.methods.base import Method, check_heads
from bt_fast.pipelines.bounds import bounded, check
from bt_fast.pipelines.spec import ViewSpec


@dataclass
class SwAVConfig:
    projector: str = "2048-128"
    """Projection-head widths (hidden_mlp-feat_dim), dash separated; the last is D."""
    n_prototypes: int = bounded(3000, ge=1, le=1_000_000)
    """K, the number of prototypes (clusters)."""
    temperature: float = bounded(0.1, gt=0, le=100)
    """Softmax temperature of the predictions."""
    epsilon: float = bounded(0.05, ge=0.01, le=100)
    """Entropic regularisation of Sinkhorn-Knopp (the codes' softness); exp(score / epsilon)
    must stay finite in fp32, so not below 0.01 (the paper's value is 0.05)."""
    sinkhorn_iters: int = bounded(3, ge=1, le=1000)
    """Sinkhorn-Knopp iterations."""
    freeze_prototypes_steps: int = bounded(313, ge=0)
    """The prototypes get no update for this many first steps."""
    queue_length: int = bounded(0, ge=0, le=10_000_000)
    """Past global-crop embeddings in Sinkhorn-Knopp, over all ranks (each keeps
    queue_length / world size per global crop); 0: no queue. main_swav.py: 3840 at batch 256."""
    queue_start_steps: int = bounded(0, ge=0)
    """The queue starts filling at this step and joins the codes once full (main_swav.py:
    epoch 15, about 75,000 steps at batch 256)."""
    views: List[ViewSpec] = field(default_factory=list)
    """The crops SwAV trains with when it is ``method.name`` (global first); empty = the
    config's ``views`` (or the ``multicrop`` preset)."""

    def __post_init__(self):
        check(self)  # each number against the range declared beside it
        check_heads(self.projector)


class SwAV(Method):
    """Backbone + projector + prototypes; V crops -> V prototype-score tensors [B, K]."""

    Config = SwAVConfig
    views_preset = "multicrop"
    n_views = None  # multi-crop: 2 global crops, then any number of local ones

    def __init__(self, model_cfg, cfg: SwAVConfig):
        super().__init__(model_cfg, cfg)
        self.projector = self.mlp(cfg.projector, hidden_bias=True, last_bias=True)
        dim = parse_widths(cfg.projector, "projector")[-1]
        self.prototypes = nn.Linear(dim, cfg.n_prototypes, bias=False)
        self.normalize_prototypes()
        self.frozen = True
        # The queue (module docstring): plain tensors, not buffers (per rank, not in the
        # state dict). queue [n_global, L, D] fp32 newest first, rows: filled rows (device).
        self.queue: torch.Tensor | None = None
        self.queue_rows: torch.Tensor | None = None
        self.queue_full = False  # host copy of queue_rows == L, read while the queue fills
        self.queue_in: torch.Tensor | None = None  # this step's global-crop z [n_global B, D]

    @torch.no_grad()
    def normalize_prototypes(self, applied: torch.Tensor | None = None) -> None:
        """Rows of C to unit length; where ``applied`` (0-d device bool) is False, untouched."""
        w = self.prototypes.weight
        unit = F.normalize(w, dim=1)
        w.copy_(unit if applied is None else torch.where(applied, unit, w))

    def forward(self, views):
        z = F.normalize(self.projector(self.encode(views)), dim=1)  # [V B, D]
        if self.cfg.queue_length:  # what after_step pushes into the queue (no graph kept)
            self.queue_in = z[: self.n_global * len(views[0])].detach().float()
        # Scores in fp32 whatever the autocast: exp(s / 0.05) turns bf16's 3 digits of a
        # cosine into a 10 % error in the codes. K x D x V B flops: small next to the backbone.
        with torch.autocast(z.device.type, enabled=False):
            scores = z.float() @ self.prototypes.weight.float().T  # [V B, K]
        return list(scores.chunk(len(views)))

    def loss(self, outputs, group=None):
        c = self.cfg
        return swav_loss(outputs, n_global=self.n_global, temperature=c.temperature, epsilon=c.epsilon,
                         iters=c.sinkhorn_iters, group=group, queue_scores=self.queue_scores()), {}

    @torch.no_grad()
    def queue_scores(self) -> list[torch.Tensor] | None:
        """Per global crop, the full queue's scores [L, K] against the current prototypes
        (fp32); None while there is no full queue."""
        if self.queue is None:
            return None
        if not self.queue_full:
            self.queue_full = bool(self.queue_rows >= self.queue.shape[1])  # SYNC: while filling only
            if not self.queue_full:
                return None
        with torch.autocast(self.queue.device.type, enabled=False):
            return list(self.queue @ self.prototypes.weight.float().T)  # n_global x [L, K]

    def baseline_loss(self, outputs):
        c = self.cfg
        return swav_loss_reference(outputs, n_global=self.n_global, temperature=c.temperature,
                                   epsilon=c.epsilon, iters=c.sinkhorn_iters, queue_scores=self.queue_scores())

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        self.frozen = step < self.cfg.freeze_prototypes_steps

    def drop_frozen_grads(self) -> None:
        if self.frozen:
            self.prototypes.weight.grad = None

    def after_step(self, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """Prototypes back onto the unit sphere, this step's embeddings into the queue; a
        skipped step changes nothing, not even the last bit a re-normalisation would."""
        self.normalize_prototypes(applied)
        if self.queue_in is not None and step >= self.cfg.queue_start_steps:
            self.push_queue(applied)
        self.queue_in = None

    @torch.no_grad()
    def push_queue(self, applied: torch.Tensor) -> None:
        """FIFO: the step's [B, D] per global crop in front, the oldest rows out; nothing
        where ``applied`` (0-d device bool) is False. Cost: one [n_global, L, D] copy."""
        z = self.queue_in.reshape(self.n_global, -1, self.queue_in.shape[1])  # [n_global, B, D]
        if self.queue is None:
            self.queue = z.new_zeros(self.n_global, self.local_length(), z.shape[2])
            self.queue_rows = torch.zeros((), dtype=torch.int64, device=z.device)
        length = self.queue.shape[1]
        pushed = torch.cat([z, self.queue], dim=1)[:, :length]
        self.queue.copy_(torch.where(applied, pushed, self.queue))
        self.queue_rows = torch.where(applied, (self.queue_rows + z.shape[1]).clamp(max=length), self.queue_rows)

    def local_length(self) -> int:
        """L, this rank's rows per global crop (bt_fast.train.check_data: W divides queue_length)."""
        return self.cfg.queue_length // collectives.world_size()

    def rank_state(self) -> dict | None:
        """This rank's queue for the checkpoint (CPU copies); None when the queue is off."""
        if not self.cfg.queue_length:
            return None
        if self.queue is None:
            return {}
        return {"queue": self.queue.to("cpu", copy=True), "rows": self.queue_rows.to("cpu", copy=True)}

    def load_rank_state(self, state: dict | None, device) -> str | None:
        """Restore ``rank_state``'s queue; a warning (and an empty queue) where it does not fit."""
        self.queue, self.queue_rows, self.queue_full = None, None, False
        if not state:  # none saved (queue off, or not started yet): it starts empty
            return None
        if not self.cfg.queue_length:
            return "the checkpoint's SwAV queue is not used (method.swav.queue_length=0)"
        queue, rows = state.get("queue"), state.get("rows")
        length = self.local_length()
        want = (self.n_global, length, self.prototypes.weight.shape[1])
        if not (torch.is_tensor(queue) and torch.is_tensor(rows) and tuple(queue.shape) == want
                and queue.dtype == torch.float32 and rows.dim() == 0 and 0 <= int(rows) <= length):
            got = tuple(queue.shape) if torch.is_tensor(queue) else type(queue).__name__
            return (f"the checkpoint's SwAV queue ({got}) does not fit method.swav.queue_length="
                    f"{self.cfg.queue_length} ({want} per rank): the queue starts empty")
        self.queue, self.queue_rows = queue.to(device), rows.to(device, torch.int64)
        return None
