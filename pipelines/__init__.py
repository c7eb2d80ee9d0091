"""bt_fast.pipelines: DALI multi-view augmentation, method-agnostic.

A library of its own: it never imports the trainer. ``ViewSpec`` holds one view's
parameters, ``presets`` the published recipes, ``FolderSource``/``WebDatasetSource``
the readers and ``MultiViewLoader`` the sharded, resumable torch iterator.
"""

from . import presets
from .spec import ViewSpec, expand
from .readers import FolderSource, WebDatasetSource
from .loader import MultiViewLoader

__all__ = ["presets", "ViewSpec", "expand", "FolderSource", "WebDatasetSource", "MultiViewLoader"]
