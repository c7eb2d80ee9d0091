"""SSL methods behind one seam (see base.py): name -> class.

    from bt_fast import methods
    model = methods.build(cfg)          # cfg.method.name picks the class
    outputs = model(views)              # under autocast, through DDP
    loss, terms = model.loss(outputs, group)

Adding a method is one file here with a ``Method`` subclass and its ``Config``
dataclass, plus one line in ``METHODS`` (README: "Add a method in one file").
"""

from __future__ import annotations

from bt_fast.methods.barlow_twins import BarlowTwins
from bt_fast.methods.base import Method
from bt_fast.methods.byol import BYOL
from bt_fast.methods.dino import DINO
from bt_fast.methods.simclr import SimCLR
from bt_fast.methods.swav import SwAV
from bt_fast.methods.vicreg import VICReg

METHODS: dict[str, type[Method]] = {
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "simclr": SimCLR,
    "byol": BYOL,
    "swav": SwAV,
    "dino": DINO,
}


def build(cfg) -> Method:
    """The method ``cfg.method.name`` names, with its section of ``cfg.method``."""
    cls = METHODS[cfg.method.name]
    return cls(cfg.model, getattr(cfg.method, cfg.method.name))


__all__ = ["METHODS", "Method", "build"]
