"""The two small string forms of the config, parsed: a readout spec (``model.readout``,
``--readout``) and a stop target (``train.stop_at``, ``bench tta --target``).

Each parser is the one place its form is checked; errors are ValueErrors naming the
form, which config turns into one ConfigError line and the CLIs into exit 2.
"""

from __future__ import annotations


MAX_GRID = 32
"""Largest readout grid side: 32 x 32 cells of a layer4 map is already 2 M features."""


def parse_readout(spec: str) -> list[tuple[int, int]]:
    """'layer3:4,layer4:2' -> [(3, 4), (4, 2)]: ResNet stage (1-4), average-pool grid side.

    ValueError naming the key otherwise. Used by bt_fast.eval.readout, which reads them.
    """
    items = []
    for item in str(spec).split(","):
        stage, _, grid = item.strip().partition(":")
        ok_grid = grid.isascii() and grid.isdigit() and 0 < int(grid) <= MAX_GRID
        if not (stage in ("layer1", "layer2", "layer3", "layer4") and ok_grid):
            raise ValueError(f"readout={str(spec)[:80]!r}: expected items like layer4:1 or layer3:4,layer4:2 "
                             f"(stage layer1-layer4, grid side 1-{MAX_GRID})")
        items.append((int(stage[-1]), int(grid)))
    return items


def parse_stop_at(spec: str) -> tuple[str, float] | None:
    """"knn=85.0" -> ("knn", 85.0); "" -> None; ValueError naming the forms otherwise."""
    if not spec:
        return None
    metric, _, value = str(spec).partition("=")
    try:
        target = float(value)
    except ValueError:
        target = None
    if metric.strip() not in ("knn", "linear") or target is None:
        raise ValueError(f"stop_at={spec!r}: expected knn=TOP1 or linear=TOP1, e.g. knn=85.0")
    if not 0.0 <= target <= 100.0:  # also NaN: a top-1 % outside [0, 100] is never reached
        raise ValueError(f"stop_at={spec!r}: the target is a top-1 %, in [0, 100]")
    return metric.strip(), target
