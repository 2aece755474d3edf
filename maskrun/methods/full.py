"""Full fine-tuning: every entry trains; its curve is traced along the learning rate (and epochs)."""

from maskrun.methods import base

USES_MASK = False
DIAL = "finetune.lr"


def check(cfg) -> None:
    """Nothing beyond the mask being none (maskrun.validate checks that for every method without USES_MASK)."""


def build(cfg, context) -> base.Method:
    return base.Method(cfg, context)
