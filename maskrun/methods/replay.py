"""Replay (Bethune et al., 2025): a share of the fine-tuning steps also trains on the pretraining objective.

Step s (1-based) replays when floor(s · share) > floor((s − 1) · share), so the first S steps hold
exactly floor(S · share) replay steps, evenly spread. At a replay step every micro-batch adds
`weight` × the pretraining loss of `batch_size` blocks of the pretraining corpus's training texts
(never its validation or test slices: those measure forgetting), drawn and masked as pretraining
draws them, from a seeded generator of its own.

The loss is taken under the checkpoint's own pretraining head with the task model's backbone in it,
so replay trains the very backbone that fine-tuning trains; the head's own parameters stay at their
pretrained values (they are not part of the task model). A causal-LM task model is the pretraining
model itself, head included, and replays as it is. Its curve is traced along share.
"""

import math
from fractions import Fraction

import torch

from maskrun.checks import in_range, positive_int
from maskrun.errors import ConfigError
from maskrun.methods import base

USES_MASK = True
DIAL = "method.share"
SEED_OFFSET = 2  # fine-tuning draws its batch order from seed and its input noise from seed + 1


def check(cfg) -> None:
    from maskrun.models import pretraining_objective  # keeps transformers off the config-check path

    in_range(cfg.method.share, "method.share", "0.1", 0.0, 1.0, lower_open=True)
    in_range(cfg.method.weight, "method.weight", "1.0", 0.0, math.inf, lower_open=True, upper_open=True)
    positive_int(cfg.method.batch_size, "method.batch_size")
    if pretraining_objective(cfg.model, cfg.pretrain) is None:
        raise ConfigError(f"method=replay needs a pretraining head, and model={cfg.model.name} with pretrain.steps=0 "
                          f"has none", "pretrain it (pretrain.steps>0) or choose another method")


def build(cfg, context) -> base.Method:
    return Replay(cfg, context)


def replays(step: int, share: Fraction) -> bool:
    """Whether optimizer step `step` (1-based) takes a replay batch: exactly floor(S · share) of the first S do."""
    return math.floor(step * share) > math.floor((step - 1) * share)


class Replay(base.Method):
    def __init__(self, cfg, context: base.Context):
        super().__init__(cfg, context)
        self.share = Fraction(str(cfg.method.share))  # the decimal as written: 0.29 · 100 is 29, not 28.999…

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from maskrun.models import load_pretraining_model, pretraining_objective
        from maskrun.pretrain import pack_texts

        cfg, context = self.cfg, self.context
        self.objective = pretraining_objective(cfg.model, cfg.pretrain)
        pretraining_model = load_pretraining_model(context.pretrained_dir, self.objective)
        if type(model) is type(pretraining_model):  # the task trains the pretraining model itself (causal-LM tasks)
            self.pretraining_model = model
        else:
            setattr(pretraining_model, pretraining_model.base_model_prefix, model.base_model)
            pretraining_model.tie_weights()  # output embeddings = the task model's input embeddings, if tied
            backbone = {id(p) for p in model.base_model.parameters()}
            for param in pretraining_model.parameters():
                if id(param) not in backbone:
                    param.requires_grad_(False)
            self.pretraining_model = pretraining_model.to(context.device)
        self.blocks = pack_texts(context.tokenizer, context.corpus.train, cfg.pretrain.max_length)
        self.generator = torch.Generator().manual_seed(cfg.seed + SEED_OFFSET)
        return model

    def generators(self) -> dict[str, torch.Generator]:
        return {"replay": self.generator}

    def extra_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        from maskrun.finetune import AUTOCAST_DTYPES
        from maskrun.pretrain import objective_batch, objective_loss

        if not replays(step, self.share):
            return None
        rows = torch.randint(len(self.blocks), (self.cfg.method.batch_size,), generator=self.generator)
        inputs, labels = objective_batch(self.context.tokenizer, self.blocks[rows], self.objective,
                                         self.cfg.pretrain.mlm_probability, self.generator)
        device, precision = self.context.device, self.cfg.finetune.precision
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision], enabled=precision != "fp32"):  # as the task's
            loss = objective_loss(self.pretraining_model, inputs.to(device), labels.to(device), self.objective)
        return self.cfg.method.weight * loss
