"""bt_fast.pipelines: DALI multi-view augmentation, method-agnostic.

A library of its own: it never imports the trainer. ``ViewSpec`` holds one view's
parameters, ``presets`` the published recipes, ``FolderSource``/``WebDatasetSource``
the readers and ``MultiViewLoader`` the sharded, resumable torch iterator.

``ViewSpec``, ``expand`` and ``presets`` are plain Python; the readers and the loader
import DALI, so they load on first use (PEP 562 ``__getattr__``): ``import
bt_fast.config`` (and so eval, export, doctor) works where DALI is not installed.
"""

from importlib import import_module

from . import presets
from .spec import ViewSpec, expand

_LAZY = {"FolderSource": ".readers", "WebDatasetSource": ".readers", "MultiViewLoader": ".loader"}

__all__ = ["presets", "ViewSpec", "expand", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
