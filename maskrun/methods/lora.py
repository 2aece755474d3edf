"""LoRA (Hu et al., 2021) through HF PEFT: low-rank adapters on the backbone's linear layers, the head trains fully.

The pretrained weights never train; each targeted layer learns W + (alpha / rank)·B·A instead. The head
(every task-model parameter the pretrained checkpoint does not hold) is never adapted: PEFT trains a
full copy of its modules (`modules_to_save`). After fine-tuning the adapter is saved as it is
(`adapter/`, for PeftModel.from_pretrained on the pretrained task model) and merged into the weights,
so forgetting, CKA and drift measure the merged model, and `finetuned/` holds it.

peft (and transformers under it) take seconds to import: they are imported where they are used, so that
registering this method slows down no other command.
"""

import re
import warnings

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from maskrun.checks import in_range, is_number, positive_int
from maskrun.errors import ConfigError
from maskrun.methods import base

USES_MASK = False
DIAL = "method.rank"
ADAPTER_DIR = "adapter"


def peft_targets(target_modules) -> str | list[str]:
    """PEFT's own form: a string is a regex over module names (or "all-linear"), a list names module suffixes."""
    return list(target_modules) if isinstance(target_modules, ListConfig) else target_modules


def head_modules(model: torch.nn.Module, pretrained: set[str]) -> list[str]:
    """The modules that hold the head's parameters, in model order."""
    from maskrun.models import head_summary

    head = head_summary(model, pretrained)["head_parameters"]
    return list(dict.fromkeys(name.rsplit(".", 1)[0] for name in head))


def adapt(model: torch.nn.Module, mcfg: DictConfig, head: list[str], seed: int) -> torch.nn.Module:
    """`model` under LoRA adapters (a PeftModel): only the adapters and the `head` modules' copies train."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2's Conv1D layers store their weight as input x output; PEFT must be told (else it warns and fixes it).
    transposed = any(isinstance(module, Conv1D) for module in model.modules())
    config = LoraConfig(r=mcfg.rank, lora_alpha=mcfg.alpha, lora_dropout=mcfg.dropout, fan_in_fan_out=transposed,
                        target_modules=peft_targets(mcfg.target_modules), modules_to_save=head)
    torch.manual_seed(seed)  # PEFT draws the A matrices from the global RNG, whatever the earlier stages left there
    with warnings.catch_warnings():  # PEFT asks transformers for a renamed attribute: not the user's concern
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


class LoRA(base.Method):
    def __init__(self, cfg: DictConfig, context: base.Context):
        super().__init__(cfg, context)
        self.head: list[str] = []
        self.adapted_modules = 0
        self.saved = False

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from maskrun.models import pretrained_names

        self.head = head_modules(model, pretrained_names(self.context.pretrained_dir))
        model = adapt(model, self.cfg.method, self.head, self.cfg.seed)
        self.adapted_modules = len(model.base_model.targeted_module_names)
        return model

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.cfg.save_model:
            model.save_pretrained(self.context.run_dir / ADAPTER_DIR)
            self.saved = True
        return model.merge_and_unload()

    def record(self) -> dict:
        return super().record() | {"adapted_modules": self.adapted_modules, "head_modules": self.head}

    def artifacts(self) -> dict:
        return {"adapter": ADAPTER_DIR if self.saved else None}


def build(cfg: DictConfig, context: base.Context) -> LoRA:
    return LoRA(cfg, context)


def check(cfg: DictConfig) -> None:
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    from maskrun.models import backbone_shapes_of

    mcfg = cfg.method
    if cfg.finetune.unfreeze_after is not None:
        raise ConfigError(f"finetune.unfreeze_after={cfg.finetune.unfreeze_after} would release every pretrained entry, "
                          "but method=lora trains adapters only", "drop finetune.unfreeze_after, or use method=full")
    positive_int(mcfg.rank, "method.rank")
    if not is_number(mcfg.alpha) or not 0 < mcfg.alpha < float("inf"):
        raise ConfigError(f"method.alpha={mcfg.alpha!r} must be a positive number", "e.g. method.alpha=16")
    in_range(mcfg.dropout, "method.dropout", "0.05", 0.0, 1.0, upper_open=True)
    target_modules = mcfg.target_modules
    if not (isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        check_targets(target_modules, backbone_shapes_of(OmegaConf.to_yaml(cfg.model), OmegaConf.to_yaml(cfg.pretrain)))


def check_targets(target_modules, shapes: dict[str, torch.Size]) -> None:
    """Every target must name some layer of the backbone (the head is never a target), as PEFT matches names."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    how = "give PEFT's all-linear, a regex over module names, or a list of name suffixes, e.g. [query, value]"
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ConfigError(f"method.target_modules={target_modules!r} is not a valid regex: {err}", how) from None
        targets = {target_modules: target_modules}
    elif isinstance(target_modules, ListConfig) and target_modules and all(isinstance(t, str) for t in target_modules):
        targets = {name: [name] for name in target_modules}  # each entry on its own: a typo must not hide in a list
    else:
        raise ConfigError(f"method.target_modules={target_modules!r} is neither a string nor a list of names", how)
    # Layers LoRA can adapt hold a weight matrix (linear, Conv1D, embedding); norms hold vectors.
    layers = sorted({name.rsplit(".", 1)[0] for name, shape in shapes.items() if name.endswith(".weight") and len(shape) >= 2})
    for entry, target in targets.items():
        config = LoraConfig(target_modules=target)
        if not any(check_target_module_exists(config, layer) for layer in layers):
            raise ConfigError(f"method.target_modules entry {entry!r} matches no layer of the backbone",
                              f"the backbone's layers are named like {layers[0]} ... {layers[-1]}; {how}")
