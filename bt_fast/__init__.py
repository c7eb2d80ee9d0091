"""bt_fast: Barlow Twins at hardware speed."""

__version__ = "0.1.0"
