"""Step time and optimizer memory of maskrun's masked fine-tuning against plain full fine-tuning.

One process, one tiny-BERT fine-tuning batch (the default model: hidden 128, 2 layers, vocab 8000;
batch 32 x 64 tokens), interleaved repeats: each round every method takes one training step
(forward, backward, clip to norm 1, AdamW step) in a rotated order, so machine load falls on all
of them alike; medians are reported.

    (a) full          plain torch AdamW over every parameter
    (b) element_r*    maskrun, random element mask at ratio r
    (c) layers        maskrun, embeddings + bottom half of the encoder layers frozen whole
    (d) naive_r0.5    gradient hooks zero frozen gradients, frozen entries restored after each step
    (e) shira         PEFT's SHiRA, beside maskrun at SHiRA's trainable count
    (f) lora          maskrun's method=lora at its default settings (conf/method/lora.yaml): PEFT adapters, head whole
    (g) l2sp, ewc     maskrun with nothing frozen plus the penalty towards the pretrained weights (method=l2sp,
                      method=ewc); the copies the penalty keeps (W_pre, and F for ewc) are printed beside the
                      optimizer state, which they are not part of

Usage: python scripts/bench_finetune.py [--repeats 30] [--threads N] [--json]   (--json: the last line is JSON)
"""

import argparse
import copy
import json
import statistics
import time
from importlib.resources import files
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertForSequenceClassification

from maskrun.masks.random import build as random_mask
from maskrun.methods.l2sp import squared_distance
from maskrun.methods.lora import adapt
from maskrun.optim import MaskedOptimizer

BATCH, SEQ, LR, MAX_GRAD_NORM = 32, 64, 1e-4, 1.0
ADAMW = SimpleNamespace(name="adamw", weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)
SHIRA_RANK = 8
SHIRA_TARGETS = ["query", "key", "value", "dense"]
HEAD_MODULES = ["bert.pooler.dense", "classifier"]  # what a BERT task model on a masked-LM checkpoint adds


def tiny_bert() -> BertForSequenceClassification:
    mcfg = OmegaConf.load(files("maskrun.conf") / "model" / "tiny_bert.yaml")
    config = BertConfig(vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size, num_hidden_layers=mcfg.num_layers,
                        num_attention_heads=mcfg.num_heads, intermediate_size=mcfg.intermediate_size,
                        max_position_embeddings=mcfg.max_position_embeddings, num_labels=2)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def backbone(model) -> dict[str, torch.Tensor]:
    """The pretrained part: everything but the newly initialised pooler and classifier."""
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith("bert.") and "pooler" not in n}


def bottom_half_mask(model) -> dict[str, torch.Tensor]:
    half = model.config.num_hidden_layers // 2
    frozen_prefixes = ["bert.embeddings."] + [f"bert.encoder.layer.{i}." for i in range(half)]
    return {n: torch.full(p.shape, n.startswith(tuple(frozen_prefixes))) for n, p in backbone(model).items()}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def loss_of(model, batch) -> torch.Tensor:
    return model(**batch).loss


class Full:
    """(a) The plain loop everyone writes."""

    def __init__(self, model):
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=ADAMW.weight_decay)

    def step(self, batch) -> None:
        loss_of(self.model, batch).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        return state_bytes(self.optimizer)

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class Masked:
    """(b), (c): maskrun's engine."""

    def __init__(self, model, frozen: dict[str, torch.Tensor]):
        self.model, self.optimizer = model, MaskedOptimizer(model, frozen, ADAMW, LR)

    def step(self, batch) -> None:
        loss_of(self.model, batch).backward()
        self.optimizer.step(MAX_GRAD_NORM)

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()

    def trainable(self) -> int:
        # Shadows are empty between steps; their indices count the trainable entries.
        return sum(p.numel() for p in self.optimizer.trainable_tensors()) + sum(p.index.numel() for p in self.optimizer.partial)


class Naive(Full):
    """(d) The plain loop plus gradient hooks that zero the frozen gradients; weight decay and momentum
    still move frozen entries, so a copy of the pretrained values is written back over them after each step."""

    def __init__(self, model, frozen: dict[str, torch.Tensor]):
        super().__init__(model)
        self.frozen = frozen
        params = dict(model.named_parameters())
        self.pretrained = {n: params[n].detach().clone() for n in frozen}
        for name, mask in frozen.items():
            params[name].register_hook(lambda grad, keep=~mask: grad * keep)

    def step(self, batch) -> None:
        super().step(batch)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, mask in self.frozen.items():
                params[name].copy_(torch.where(mask, self.pretrained[name], params[name]))

    def trainable(self) -> int:
        return sum(int((~m).sum()) for m in self.frozen.values()) + sum(
            p.numel() for n, p in self.model.named_parameters() if n not in self.frozen)


class Shira(Full):
    """(e) PEFT's SHiRA: a sparse trainable delta on the encoder's linear layers; its indices count as state."""

    def __init__(self, model):
        from peft import ShiraConfig, get_peft_model

        config = ShiraConfig(r=SHIRA_RANK, target_modules=SHIRA_TARGETS, task_type="SEQ_CLS", random_seed=0)
        self.model = get_peft_model(model, config)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=ADAMW.weight_decay)

    def step(self, batch) -> None:
        loss_of(self.model, batch).backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        indices = sum(t.numel() * t.element_size() for m in self.model.modules()
                      for t in getattr(m, "shira_indices", {}).values())
        return state_bytes(self.optimizer) + indices

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


class Penalised(Masked):
    """(f) The task loss plus strength/2 · Σ importance · (W − W_pre)² over the backbone (importance: ewc's Fisher)."""

    def __init__(self, model, strength: float, importance: dict[str, torch.Tensor] | None = None):
        super().__init__(model, {})
        self.strength, self.importance = strength, importance
        pretrained = backbone(model)
        self.params = {n: p for n, p in model.named_parameters() if n in pretrained}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def step(self, batch) -> None:
        penalty = self.strength / 2 * squared_distance(self.params, self.anchor, self.importance)
        (loss_of(self.model, batch) + penalty).backward()
        self.optimizer.step(MAX_GRAD_NORM)

    def penalty_bytes(self) -> int:
        kept = list(self.anchor.values()) + list((self.importance or {}).values())
        return sum(t.numel() * t.element_size() for t in kept)


def penalties(base) -> dict[str, Penalised]:
    """l2sp and ewc at their default strengths (conf/method/); the step time does not depend on the values of
    the Fisher, so ewc's is a stand-in of the right shapes."""
    defaults = {name: OmegaConf.load(files("maskrun.conf") / "method" / f"{name}.yaml") for name in ("l2sp", "ewc")}
    stand_in_fisher = {n: p.square() for n, p in backbone(base).items()}
    return {"l2sp": Penalised(copy.deepcopy(base), defaults["l2sp"].alpha),
            "ewc": Penalised(copy.deepcopy(base), defaults["ewc"].strength, stand_in_fisher)}


def shira_count_mask(model) -> dict[str, torch.Tensor]:
    """maskrun's mask with SHiRA's trainable entries: r(m+n) random entries of each targeted weight,
    everything else in the backbone (and the pooler, which PEFT freezes too) frozen."""
    generator = torch.Generator().manual_seed(0)
    frozen = {}
    for name, param in model.named_parameters():
        if "classifier" in name:
            continue
        mask = torch.ones(param.numel(), dtype=torch.bool)
        if name.endswith(".weight") and name.split(".")[-2] in SHIRA_TARGETS:
            trainable = SHIRA_RANK * sum(param.shape)
            mask[torch.randperm(param.numel(), generator=generator)[:trainable]] = False
        frozen[name] = mask.view(param.shape)
    return frozen


def methods() -> dict:
    base = tiny_bert()
    lora_defaults = OmegaConf.load(files("maskrun.conf") / "method" / "lora.yaml")
    element = {r: random_mask(SimpleNamespace(ratio=r, allocation="global", granularity="element"), backbone(base), None, seed=0).masks for r in (0.5, 0.9)}
    return {
        "full": Full(copy.deepcopy(base)),
        "element_r0.5": Masked(copy.deepcopy(base), element[0.5]),
        "element_r0.9": Masked(copy.deepcopy(base), element[0.9]),
        "layers_bottom_half": Masked(copy.deepcopy(base), bottom_half_mask(base)),
        "naive_r0.5": Naive(copy.deepcopy(base), element[0.5]),
        "shira": Shira(copy.deepcopy(base)),
        "maskrun_at_shira_count": Masked(copy.deepcopy(base), shira_count_mask(base)),
        # As the pipeline trains it: the PEFT model under maskrun's optimizer, nothing masked.
        "lora": Masked(adapt(copy.deepcopy(base), lora_defaults, HEAD_MODULES, seed=0), {}),
        **penalties(base),
    }


def fixed_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, vocab_size, (BATCH, SEQ), generator=generator),
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH,), generator=generator)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (each method steps once per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = methods()
    batch = fixed_batch(tiny_bert().config.vocab_size)
    times = {name: [] for name in runs}
    for round_ in range(args.warmup + args.repeats):
        names = list(runs)
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name].step(batch)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)

    raw = {name: {"median_step_s": statistics.median(times[name]), "optimizer_state_bytes": run.state_bytes(),
                  "trainable": run.trainable()} for name, run in runs.items()}
    full = raw["full"]
    print(f"{'method':<24}{'step ms':>9}{'x full':>8}{'state MB':>10}{'x full':>8}{'trainable':>11}")
    for name, r in raw.items():
        print(f"{name:<24}{r['median_step_s'] * 1e3:>9.1f}{r['median_step_s'] / full['median_step_s']:>8.3f}"
              f"{r['optimizer_state_bytes'] / 2**20:>10.2f}{r['optimizer_state_bytes'] / full['optimizer_state_bytes']:>8.3f}"
              f"{r['trainable']:>11,}")
    for name in ("l2sp", "ewc"):
        kept = runs[name].penalty_bytes()
        print(f"{name} keeps {kept / 2**20:.2f} MB for its penalty ({kept / full['optimizer_state_bytes']:.3f} x full's state)")

    def ratio(name: str, key: str) -> float:
        return raw[name][key] / full[key]

    result = {
        "element_r0.5_step_ratio": ratio("element_r0.5", "median_step_s"),
        "element_r0.9_step_ratio": ratio("element_r0.9", "median_step_s"),
        "layers_bottom_half_step_ratio": ratio("layers_bottom_half", "median_step_s"),
        "naive_r0.5_step_ratio": ratio("naive_r0.5", "median_step_s"),
        "state_bytes_ratio_r0.5": ratio("element_r0.5", "optimizer_state_bytes"),
        "state_bytes_ratio_r0.9": ratio("element_r0.9", "optimizer_state_bytes"),
        "shira_step_ratio": ratio("shira", "median_step_s"),
        "maskrun_at_shira_count_step_ratio": ratio("maskrun_at_shira_count", "median_step_s"),
        "shira_state_bytes_ratio": ratio("shira", "optimizer_state_bytes"),
        "maskrun_at_shira_count_state_bytes_ratio": ratio("maskrun_at_shira_count", "optimizer_state_bytes"),
        "lora_step_ratio": ratio("lora", "median_step_s"),
        "lora_state_bytes_ratio": ratio("lora", "optimizer_state_bytes"),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "raw": raw,
    }
    for name in ("l2sp", "ewc"):
        result[f"{name}_step_ratio"] = ratio(name, "median_step_s")
        result[f"{name}_state_bytes_ratio"] = ratio(name, "optimizer_state_bytes")
        result[f"{name}_penalty_bytes_ratio"] = runs[name].penalty_bytes() / full["optimizer_state_bytes"]
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
