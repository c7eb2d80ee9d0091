"""bt_fast.pipelines: DALI multi-view augmentation, method-agnostic.

A library of its own: it never imports the trainer. See ``ViewSpec`` for one view's
parameters and ``presets`` for published recipes.
"""

from .spec import ViewSpec, expand

__all__ = ["ViewSpec", "expand"]
