"""Masks that move during fine-tuning (mask=child_tuning, mask=lisa): what they share.

A moving strategy's `mask` stage freezes nothing for the whole run; what is frozen is decided step by step by a
`MovingMask`, which the pipeline hands to the fine-tuning loop as a callback. It keeps the masked optimizer's
guarantees at every step: an entry frozen at a step is bit-identical before and after it (no gradient, no weight
decay, no momentum), and optimizer state exists only for what can train.

After the run, `mask.safetensors` holds the entries frozen at every step (hence bit-identical to the pretrained
ones, as for a static mask), so `ratio_actual` is the share frozen throughout; `step_frozen_share` is the mean
share frozen per step (what `mask.ratio` asks of a moving mask), `ever_trainable_share` the share trainable at one
step at least, and `moved_share` the share the fine-tuned model holds at a value other than the pretrained one
(read from the pretrained checkpoint one tensor at a time: the mask keeps no copy of the weights).
"""

import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import safe_open

from maskrun.errors import ConfigError


class MovingMask(ABC):
    """Which eligible entries are frozen at each fine-tuning step, and a record of it.

    It speaks maskrun.finetune's Callback protocol without importing it: the mask stage's cache key covers this
    package's code, which must not depend on the training loop's.
    """

    def __init__(self, model: torch.nn.Module, names):
        self.params = {name: param for name, param in model.named_parameters() if name in names}
        self.ever_trainable = {name: torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                               for name, p in self.params.items()}
        self.frozen_per_step: list[int] = []

    @abstractmethod
    def frozen_now(self) -> dict[str, torch.Tensor]:
        """One bool tensor per eligible parameter: True where frozen at the current step."""

    def on_step_begin(self, step: int, model, optimizer) -> None:
        """A subclass decides the step's mask, then calls this to account for it."""
        frozen = self.frozen_now()
        for name, mask in frozen.items():
            self.ever_trainable[name] |= ~mask
        self.frozen_per_step.append(sum(int(mask.sum()) for mask in frozen.values()))

    def on_step_end(self, step: int, model, optimizer, record: dict) -> None:
        """After the optimizer step."""

    def on_validation(self, record: dict) -> None:
        """Validation changes nothing of the mask."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps (maskrun.checkpoint): the generator and what was frozen so far."""
        return {"generator": self.generator.get_state(), "ever_trainable": dict(self.ever_trainable),
                "frozen_per_step": list(self.frozen_per_step)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.ever_trainable = {name: t.to(self.params[name].device) for name, t in state["ever_trainable"].items()}
        self.frozen_per_step = list(state["frozen_per_step"])

    def resident_bytes(self) -> int:
        """What it keeps through fine-tuning beside the optimizer's state: its record of the entries trained so far."""
        return sum(t.numel() * t.element_size() for t in self.ever_trainable.values())

    def frozen_throughout(self) -> dict[str, torch.Tensor]:
        """The entries frozen at every step: the run's mask.safetensors."""
        return {name: (~trained).cpu() for name, trained in self.ever_trainable.items()}

    def record(self, pretrained_file: Path | None = None) -> dict:
        """What metrics.json `mask` adds for a moving mask (beside mask_summary of `frozen_throughout`);
        `moved_share` when given the pretrained checkpoint's weights file."""
        eligible = sum(p.numel() for p in self.params.values())
        steps = len(self.frozen_per_step)
        trainable = sum(int(t.sum()) for t in self.ever_trainable.values())
        record = {
            "steps": steps,
            "step_frozen_share": sum(self.frozen_per_step) / (steps * eligible) if steps and eligible else 0.0,
            "ever_trainable_share": trainable / eligible if eligible else 0.0,
        }
        if pretrained_file is not None:
            with safe_open(pretrained_file, framework="pt") as f:
                moved = sum(int((p.detach().cpu() != f.get_tensor(name).to(p.dtype)).sum())
                            for name, p in self.params.items())
            record["moved_share"] = moved / eligible if eligible else 0.0
        return record


def state_of(param: torch.Tensor, optimizer) -> dict:
    """The torch optimizer's state of `param` (maskrun.optim.MaskedOptimizer wraps it as `.optimizer`).

    A moving mask's static mask freezes nothing, so every eligible parameter is in the torch optimizer as itself.
    """
    return optimizer.optimizer.state.get(param, {})


def check(cfg: DictConfig) -> None:
    """What a moving mask cannot do exactly: refused before any work."""
    strategy = cfg.mask.strategy
    if cfg.method.name != "mask":
        raise ConfigError(f"mask={strategy} moves during fine-tuning under method=mask only, not method={cfg.method.name}",
                          "drop the method override")
    if cfg.sequential.dataset:
        raise ConfigError(f"experiment=sequential keeps one mask over two tasks, and mask={strategy} has none",
                          "use a static mask, e.g. mask=random")
    if cfg.finetune.unfreeze_after is not None:
        raise ConfigError(f"finetune.unfreeze_after releases every entry, and mask={strategy} decides what trains at "
                          f"every step", "set finetune.unfreeze_after=null")
    if cfg.get("devices", 1) != 1:
        raise ConfigError(f"mask={strategy} changes what trains at every step, which devices={cfg.devices} "
                          f"(one process per device) does not keep exact", "set devices=1")


def transformer_layers(shapes: dict[str, torch.Size]) -> list[list[str]]:
    """The model's stack of transformer blocks as the names of each block's parameters, bottom up.

    The blocks are the children of a ModuleList, whose parameters are named `<list>.<i>.<rest>` (BERT's
    `encoder.layer`, GPT-2's `h`, Llama's `layers`); the stack is the list that holds the most entries, so a list
    inside a block (e.g. a mixture's experts) is never taken for it. Empty when no parameter is in a list.
    """
    sizes: dict[str, int] = {}
    for name, shape in shapes.items():
        for match in re.finditer(r"\.(\d+)(?=\.)", name):
            prefix = name[:match.start()]
            sizes[prefix] = sizes.get(prefix, 0) + shape.numel()
    if not sizes:
        return []
    stack = max(sizes, key=sizes.get)
    blocks: dict[int, list[str]] = {}
    for name in shapes:
        match = re.match(re.escape(stack) + r"\.(\d+)\.", name)
        if match:
            blocks.setdefault(int(match.group(1)), []).append(name)
    return [blocks[i] for i in sorted(blocks)]
