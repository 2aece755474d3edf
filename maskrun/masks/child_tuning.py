"""Child-Tuning_F (Xu et al., 2021): each step, a fresh Bernoulli mask decides which entries' gradients apply.

At every step each eligible entry is frozen with probability r = mask.ratio, independently of the others and of
earlier steps, drawn from a generator seeded with the run's seed. An entry frozen at a step does not move at all in
it: its gradient is zeroed as it is computed (so it takes no share of the clipping budget), and its value and its
optimizer state (Adam's moments, SGD's momentum) are saved before the step and written back after it, which also
undoes weight decay. State that the step creates starts at zero at the entries it froze, where Adam's moments
start. Only the optimizer's step count, which torch keeps per tensor (Adam's bias correction), still advances.

`mask.rescale=true`, the paper's choice, scales the kept gradients by 1/(1 − r) so that their expectation is the
full gradient: with SGD this keeps the step size; with Adam it mostly cancels in the normalisation.

The mask stage freezes nothing for the whole run (every entry may train at some step); see maskrun.masks.dynamic
for what the run records instead.
"""

import torch

from maskrun.errors import ConfigError
from maskrun.masks.dynamic import MovingMask, state_of
from maskrun.masks.select import Selection

NEEDS_SCORES = False
ALLOCATIONS = ("global",)
GRANULARITIES = ("element",)


def build(mcfg, params: dict[str, torch.Tensor], scores, seed: int) -> Selection:
    """Nothing is frozen for the whole run: each step's mask is drawn during fine-tuning."""
    return Selection({name: torch.zeros(p.shape, dtype=torch.bool) for name, p in params.items()})


def check(mcfg, shapes: dict[str, torch.Size]) -> None:
    if mcfg.ratio == 1:
        raise ConfigError("mask=child_tuning with mask.ratio=1 freezes every eligible entry at every step",
                          "lower mask.ratio, or freeze them all with mask=random mask.ratio=1")
    if not isinstance(mcfg.rescale, bool):
        raise ConfigError(f"mask.rescale={mcfg.rescale!r} is not true or false", "e.g. mask.rescale=true")


def moving_mask(mcfg, model: torch.nn.Module, names, seed: int) -> "ChildTuning":
    return ChildTuning(model, names, mcfg.ratio, mcfg.rescale, seed)


class ChildTuning(MovingMask):
    def __init__(self, model: torch.nn.Module, names, ratio: float, rescale: bool, seed: int):
        super().__init__(model, names)
        self.ratio, self.rescale = ratio, rescale
        self.scale = 1 / (1 - ratio) if rescale else 1.0
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.frozen: dict[str, torch.Tensor] = {}
        self.saved_values: dict[str, torch.Tensor] = {}
        self.saved_state: dict[str, dict[str, torch.Tensor]] = {}
        self.hooks = []

    def frozen_now(self) -> dict[str, torch.Tensor]:
        return self.frozen

    def on_step_begin(self, step: int, model, optimizer) -> None:
        self.frozen = {name: torch.rand(p.shape, generator=self.generator, device=p.device) < self.ratio
                       for name, p in self.params.items()}
        for name, param in self.params.items():
            frozen = self.frozen[name]
            self.saved_values[name] = param.detach().masked_select(frozen)
            self.saved_state[name] = {key: t.masked_select(frozen) for key, t in entry_state(param, optimizer).items()}
            self.hooks.append(param.register_hook(self.gate(frozen)))
        super().on_step_begin(step, model, optimizer)

    def gate(self, frozen: torch.Tensor):
        """The gradient hook of one parameter for this step: zero where frozen, the rest rescaled."""
        scale = self.scale
        return lambda grad: grad.masked_fill(frozen, 0) * scale

    def on_step_end(self, step: int, model, optimizer, record: dict) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        with torch.no_grad():
            for name, param in self.params.items():
                frozen, saved = self.frozen[name], self.saved_state[name]
                param.masked_scatter_(frozen, self.saved_values[name])
                for key, t in entry_state(param, optimizer).items():
                    if key in saved:
                        t.masked_scatter_(frozen, saved[key])
                    else:
                        t.masked_fill_(frozen, 0)
        self.saved_values, self.saved_state = {}, {}

    def record(self, pretrained_file=None) -> dict:
        return super().record(pretrained_file) | {"rescale": self.rescale}


def entry_state(param: torch.Tensor, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer state of `param` that holds one value per entry (moments, momentum; not the step count)."""
    return {key: t for key, t in state_of(param, optimizer).items() if torch.is_tensor(t) and t.shape == param.shape}
