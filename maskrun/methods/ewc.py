"""EWC (Kirkpatrick et al., 2017): the penalty strength/2 · Σ F · (W − W_pre)², with F the Fisher score.

F is the scores stage's `fisher` of the pretrained weights on the task's training data (cached),
computed with the mask group's calibration settings (mask.fisher, mask.calib_batches,
mask.calib_batch_size). Kirkpatrick et al. take F on the old task; this one is the new task's, so it
protects the entries the task is most sensitive to rather than those pretraining relies on. It is a mean squared gradient, so its entries are small and strength is
large (conf/method/ewc.yaml gives the scale). Like L2-SP (maskrun.methods.l2sp) it covers every
pretrained entry that trains. Its curve is traced along strength (0: full fine-tuning).
"""

import torch

from maskrun.methods import base, l2sp

USES_MASK = True
DIAL = "method.strength"


def check(cfg) -> None:
    l2sp.check_strength(cfg.method.strength, "method.strength", "1e5")


def build(cfg, context) -> base.Method:
    return EWC(cfg, context, cfg.method.strength)


class EWC(l2sp.L2SP):
    def importance(self, anchor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fisher = self.context.scores("fisher")
        return {name: fisher[name].to(value.device) for name, value in anchor.items()}

    def record(self) -> dict:
        """Its settings, the calibration that F was computed with, and F's mean over the penalised entries."""
        entries = sum(f.numel() for f in self.weights.values())
        mean = sum(float(f.double().sum()) for f in self.weights.values()) / entries
        mask = self.cfg.mask
        fisher = {"kind": mask.fisher, "calib_batches": mask.calib_batches, "calib_batch_size": mask.calib_batch_size,
                  "mean": mean}
        return super().record() | {"fisher": fisher}
