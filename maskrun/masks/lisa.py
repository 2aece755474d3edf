"""LISA (Pan et al., 2024): every `mask.interval` steps, `mask.active_layers` transformer layers sampled uniformly
train and every other layer of the stack is frozen; the embeddings, everything else outside the stack (final norm,
pooler) and the head always train.

An inactive layer is frozen exactly: its parameters get requires_grad=False, so no gradient is computed for them
and the torch optimizer skips them (no weight decay, no moment update). A deactivated layer's optimizer state is
dropped, as LISA does to save memory, so state exists only for what can train; a layer sampled again later starts
from fresh state. The layers are the blocks of the model's ModuleList (maskrun.masks.dynamic.transformer_layers),
sampled without replacement from a generator seeded with the run's seed.

`mask.active_layers=null` takes the whole number of layers closest to (1 − mask.ratio) of the stack (the fewer
frozen on a tie), so that a sweep over mask.ratio traces LISA too; a number overrides the ratio.
The mask stage freezes nothing for the whole run; see maskrun.masks.dynamic for what the run records instead.
"""

import torch

from maskrun.errors import ConfigError
from maskrun.masks.dynamic import MovingMask, transformer_layers
from maskrun.masks.select import Selection, closest_prefix

NEEDS_SCORES = False
ALLOCATIONS = ("global",)
GRANULARITIES = ("tensor",)


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> Selection:
    """Nothing is frozen for the whole run: the layers that train are sampled during fine-tuning."""
    return Selection({name: torch.zeros(p.shape, dtype=torch.bool) for name, p in params.items()})


def active_layer_count(mcfg, layers: int) -> int:
    if mcfg.active_layers is not None:
        return mcfg.active_layers
    return layers - closest_prefix([1] * layers, mcfg.ratio * layers)


def check(mcfg, shapes: dict[str, torch.Size]) -> None:
    if not isinstance(mcfg.interval, int) or isinstance(mcfg.interval, bool) or mcfg.interval < 1:
        raise ConfigError(f"mask.interval={mcfg.interval!r} must be a whole number of steps >= 1", "e.g. mask.interval=20")
    active = mcfg.active_layers
    if active is not None and (not isinstance(active, int) or isinstance(active, bool) or active < 0):
        raise ConfigError(f"mask.active_layers={active!r} must be a whole number >= 0 or null",
                          "e.g. mask.active_layers=2, or null to take it from mask.ratio")
    layers = transformer_layers(shapes)
    if not layers:
        raise ConfigError("mask=lisa samples transformer layers, and no eligible parameter is in a stack of layers",
                          "let mask.include and mask.exclude select the layers, or use another strategy")
    if active is not None and active > len(layers):
        raise ConfigError(f"mask.active_layers={active} exceeds the model's {len(layers)} transformer layers",
                          f"set mask.active_layers<={len(layers)}")


def moving_mask(mcfg, model: torch.nn.Module, names, seed: int) -> "Lisa":
    layers = transformer_layers({name: p.shape for name, p in model.named_parameters() if name in names})
    return Lisa(model, names, layers, active_layer_count(mcfg, len(layers)), mcfg.interval, seed)


class Lisa(MovingMask):
    def __init__(self, model: torch.nn.Module, names, layers: list[list[str]], active: int, interval: int, seed: int):
        super().__init__(model, names)
        self.layers, self.active, self.interval = layers, active, interval
        self.generator = torch.Generator().manual_seed(seed)
        self.active_now: list[int] = []
        self.draws: list[dict] = []  # each sample: the step it starts at and the layers it activates

    def frozen_now(self) -> dict[str, torch.Tensor]:
        inactive = {name for i, layer in enumerate(self.layers) if i not in self.active_now for name in layer}
        return {name: torch.tensor(name in inactive, device=p.device).expand(p.shape) for name, p in self.params.items()}

    def on_step_begin(self, step: int, model, optimizer) -> None:
        if (step - 1) % self.interval == 0:
            self.active_now = sorted(torch.randperm(len(self.layers), generator=self.generator)[:self.active].tolist())
            self.draws.append({"step": step, "layers": self.active_now})
            for i, layer in enumerate(self.layers):
                for name in layer:
                    if i not in self.active_now:
                        optimizer.optimizer.state.pop(self.params[name], None)
            self.activate()
        super().on_step_begin(step, model, optimizer)

    def activate(self) -> None:
        for i, layer in enumerate(self.layers):
            for name in layer:
                self.params[name].requires_grad_(i in self.active_now)

    def state_dict(self) -> dict:
        return super().state_dict() | {"active_now": self.active_now, "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.active_now, self.draws = list(state["active_now"]), list(state["draws"])
        self.activate()

    def record(self, pretrained_file=None) -> dict:
        return super().record(pretrained_file) | {
            "layers": len(self.layers),
            "active_layers": self.active,
            "interval": self.interval,
            "layers_activated": sorted({i for draw in self.draws for i in draw["layers"]}),
            "layer_draws": self.draws,
        }
