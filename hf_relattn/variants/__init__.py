"""One module per attention variant; importing this package registers them all."""

from . import (  # noqa: F401
    alibi,
    fixed,
    gqa,
    moba,
    moh,
    mosa,
    power,
    prune,
    relation,
    shaw,
    sliding_window,
    strided,
    t5_bias,
)
from .base import VARIANTS, Variant, get_variant_class, register_variant

__all__ = ["VARIANTS", "Variant", "get_variant_class", "register_variant"]
