"""Moved: the backbone builder is ``bt_fast.backbone``; Barlow Twins' projector and loss
are ``bt_fast.methods.barlow_twins``. This name stays for imports of ``build_backbone``
written before the move (checkpoints never referred to it: their keys are unchanged).
"""

from bt_fast.backbone import build_backbone

__all__ = ["build_backbone"]
