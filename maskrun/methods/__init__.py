"""Fine-tuning methods: the ways to forget less that masking is compared with, at matched accuracy.

A method is one module here, one YAML in conf/method/ and one line in METHODS. Each module has

- `USES_MASK`: whether the mask group may freeze entries under it (lora trains adapters instead,
  full trains everything);
- `DIAL`: the setting its accuracy–forgetting curve is traced along (a config key);
- `check(cfg)`: its own checks before any work (ConfigError, exit 2);
- `build(cfg, context) -> Method`: what the pipeline and the fine-tuning loop ask it.

The pipeline asks the chosen method what trains (`prepare`), the loop asks what it adds to each
step's loss (`extra_loss`), then the pipeline asks which model to evaluate and save (`finish`) and
what to record in metrics.json (`record`).
"""

from omegaconf import DictConfig, OmegaConf

from maskrun.methods import ewc, full, l2sp, lora, mask, replay

METHODS = {
    "mask": mask,
    "full": full,
    "lora": lora,
    "l2sp": l2sp,
    "ewc": ewc,
    "replay": replay,
}


def build_method(cfg: DictConfig, context):
    """The chosen method, ready to be asked (maskrun.methods.base.Method)."""
    return METHODS[cfg.method.name].build(cfg, context)


def dial(cfg: DictConfig) -> dict:
    """The key and value of the setting the chosen method's curve is traced along."""
    key = METHODS[cfg.method.name].DIAL
    return {"key": key, "value": OmegaConf.select(cfg, key)}
