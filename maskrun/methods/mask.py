"""Masking: the mask group decides which pretrained entries stay frozen; nothing else constrains training."""

from maskrun.methods import base

USES_MASK = True
DIAL = "mask.ratio"


def check(cfg) -> None:
    """The mask group's own checks cover it."""


def build(cfg, context) -> base.Method:
    return base.Method(cfg, context)
