"""Step time and optimizer memory of maskrun's masked fine-tuning against plain full fine-tuning.

One process, one fixed fine-tuning batch per model. A step is forward, backward, clip to norm 1, AdamW step;
medians are reported beside full fine-tuning's, with each method's optimizer state (for maskrun everything
the masking keeps resident: the state of the trainable entries and the record of which entries train) and,
on CUDA, its peak memory (torch.cuda.max_memory_allocated while it alone is on the GPU).

Models (--models, comma-separated):
    tiny_bert   the default model (hidden 128, 2 layers, vocab 8000), batch 32 x 64: every method below
    bert_base   a random bert-base (BertConfig's defaults, 110M parameters), batch 4 x 32: (a) and (b)
    llama_0.5b  a random Llama-shaped causal LM (hidden 1024, 24 layers, intermediate 4096, vocab 32000;
                0.47B parameters), batch 8 x 256: (a) and (b); meant for --device cuda

    (a) full          plain torch AdamW over every parameter
    (b) element_r*    maskrun, random element mask at ratio r = 0.1, 0.5, 0.9
    (c) layers        maskrun, embeddings + bottom half of the encoder layers frozen whole
    (d) naive_r0.5    gradient hooks zero frozen gradients, frozen entries restored after each step
    (e) shira         PEFT's SHiRA, beside maskrun at SHiRA's trainable count
    (f) lora          maskrun's method=lora at its default settings (conf/method/lora.yaml): PEFT adapters, head whole
    (g) l2sp, ewc     maskrun with nothing frozen plus the penalty towards the pretrained weights (method=l2sp,
                      method=ewc); the copies the penalty keeps (W_pre, and F for ewc) are printed beside the
                      optimizer state, which they are not part of

On the CPU the default model's methods are all built first and step interleaved: each round every method takes
one step in a rotated order, so machine load falls on all of them alike. The bigger models (whose copies would
not all fit at once), and every model on CUDA (where a method's peak memory must be its own), run one method
at a time: built, warmed up, timed, freed.

Usage: python scripts/bench_finetune.py [--models tiny_bert,bert_base] [--device cpu|cuda] [--repeats N]
                                        [--threads N] [--json]
--json: the last line is JSON: the default model's ratios at its top level, and every model's under "models".
"""

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from maskrun.masks.random import build as random_mask
from maskrun.methods.l2sp import squared_distance
from maskrun.methods.lora import adapt
from maskrun.optim import MaskedOptimizer

LR, MAX_GRAD_NORM = 1e-4, 1.0
RATIOS = (0.1, 0.5, 0.9)
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


def bert_base() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2))


def llama_half_billion() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, intermediate_size=4096, max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def backbone(model) -> dict[str, torch.Tensor]:
    """The pretrained part: a causal LM's every parameter; a BERT classifier's all but the new pooler and head."""
    if isinstance(model, LlamaForCausalLM):
        return {n: p.detach() for n, p in model.named_parameters()}
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith("bert.") and "pooler" not in n}


def element_mask(model, ratio: float) -> dict[str, torch.Tensor]:
    mcfg = SimpleNamespace(ratio=ratio, allocation="global", granularity="element")
    return random_mask(mcfg, backbone(model), None, seed=0).masks


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
    """(b), (c): maskrun's engine. It packs the masks and keeps no reference to them."""

    def __init__(self, model, frozen: dict[str, torch.Tensor]):
        self.model, self.optimizer = model, MaskedOptimizer(model, frozen, ADAMW, LR)

    def step(self, batch) -> None:
        loss_of(self.model, batch).backward()
        self.optimizer.step(MAX_GRAD_NORM)

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()

    def trainable(self) -> int:
        # Shadows are empty between steps; each partly frozen parameter's record counts its trainable entries.
        return (sum(p.numel() for p in self.optimizer.trainable_tensors())
                + sum(part.entries.count for part in self.optimizer.partial))


class Naive(Full):
    """(d) The plain loop plus gradient hooks that zero the frozen gradients; weight decay and momentum
    still move frozen entries, so a copy of the pretrained values is written back over them after each step."""

    def __init__(self, model, frozen: dict[str, torch.Tensor]):
        super().__init__(model)
        params = dict(model.named_parameters())
        self.frozen = {n: m.to(params[n].device) for n, m in frozen.items()}
        self.pretrained = {n: params[n].detach().clone() for n in frozen}
        for name, mask in self.frozen.items():
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
    """(g) The task loss plus strength/2 · Σ importance · (W − W_pre)² over the backbone (importance: ewc's Fisher)."""

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


Factories = dict[str, Callable[[], object]]


def copy_to(base, device: torch.device):
    return copy.deepcopy(base).to(device)


def ratio_sweep(base, device: torch.device) -> Factories:
    """(a) and (b): full fine-tuning and maskrun at every ratio of RATIOS. Each method gets its own copy of the
    model on `device` when it is built; the masks are made then too, and dropped once the optimizer packed them."""
    return {"full": lambda: Full(copy_to(base, device)),
            **{f"element_r{r}": lambda r=r: Masked(copy_to(base, device), element_mask(base, r)) for r in RATIOS}}


def every_method(base, device: torch.device) -> Factories:
    """(a) to (g), for the default model."""
    lora_defaults = OmegaConf.load(files("maskrun.conf") / "method" / "lora.yaml")
    defaults = {name: OmegaConf.load(files("maskrun.conf") / "method" / f"{name}.yaml") for name in ("l2sp", "ewc")}

    def ewc() -> Penalised:
        # The step time does not depend on the values of the Fisher, so ewc's is a stand-in of the right shapes.
        model = copy_to(base, device)
        return Penalised(model, defaults["ewc"].strength, {n: p.square() for n, p in backbone(model).items()})

    return {
        **ratio_sweep(base, device),
        "layers_bottom_half": lambda: Masked(copy_to(base, device), bottom_half_mask(base)),
        "naive_r0.5": lambda: Naive(copy_to(base, device), element_mask(base, 0.5)),
        "shira": lambda: Shira(copy_to(base, device)),
        "maskrun_at_shira_count": lambda: Masked(copy_to(base, device), shira_count_mask(base)),
        # As the pipeline trains it: the PEFT model under maskrun's optimizer, nothing masked.
        "lora": lambda: Masked(adapt(copy_to(base, device), lora_defaults, HEAD_MODULES, seed=0), {}),
        "l2sp": lambda: Penalised(copy_to(base, device), defaults["l2sp"].alpha),
        "ewc": ewc,
    }


@dataclass(frozen=True)
class ModelBench:
    build: Callable[[], torch.nn.Module]
    methods: Callable[[torch.nn.Module, torch.device], Factories]
    examples: int
    tokens: int
    warmup: int  # untimed steps per method first
    repeats: int  # timed steps per method
    interleaved_on_cpu: bool  # all of its methods' copies fit in memory at once


MODELS = {
    "tiny_bert": ModelBench(tiny_bert, every_method, examples=32, tokens=64, warmup=3, repeats=30,
                            interleaved_on_cpu=True),
    "bert_base": ModelBench(bert_base, ratio_sweep, examples=4, tokens=32, warmup=1, repeats=5,
                            interleaved_on_cpu=False),
    "llama_0.5b": ModelBench(llama_half_billion, ratio_sweep, examples=8, tokens=256, warmup=2, repeats=10,
                             interleaved_on_cpu=False),
}
DEFAULT_MODEL = "tiny_bert"


def fixed_batch(model, examples: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tokens; a classifier's labels are random classes, a causal LM's are its inputs."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (examples, tokens), generator=generator)
    labels = input_ids if isinstance(model, LlamaForCausalLM) else torch.randint(0, 2, (examples,), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def timed_step(run, batch, device: torch.device) -> float:
    """Seconds of one step; on CUDA, of the work queued, not of the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def summary(run, times: list[float]) -> dict:
    result = {"median_step_s": statistics.median(times), "optimizer_state_bytes": run.state_bytes(),
              "trainable": run.trainable()}
    if isinstance(run, Penalised):
        result["penalty_bytes"] = run.penalty_bytes()
    return result


def measure_interleaved(factories: Factories, batch, device: torch.device, warmup: int, repeats: int) -> dict:
    runs = {name: make() for name, make in factories.items()}
    times = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        names = list(runs)
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = timed_step(runs[name], batch, device)
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: summary(run, times[name]) for name, run in runs.items()}


def measure_one_at_a_time(factories: Factories, batch, device: torch.device, warmup: int, repeats: int) -> dict:
    results = {}
    for name, make in factories.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()  # the batch
        run = make()
        times = [timed_step(run, batch, device) for _ in range(warmup + repeats)][warmup:]
        results[name] = summary(run, times)
        if device.type == "cuda":
            results[name]["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - before
        del run
    return results


def ratios_to_full(raw: dict) -> dict:
    """Each method's step time, optimizer state and (CUDA) peak memory as multiples of full fine-tuning's, and
    the copies a penalty keeps as a multiple of full fine-tuning's optimizer state."""
    full = raw["full"]
    keys = {"median_step_s": "step", "optimizer_state_bytes": "state_bytes", "peak_memory_bytes": "peak_memory"}
    ratios = {name: {short: r[key] / full[key] for key, short in keys.items() if key in r} for name, r in raw.items()}
    for name, r in raw.items():
        if "penalty_bytes" in r:
            ratios[name]["penalty_bytes"] = r["penalty_bytes"] / full["optimizer_state_bytes"]
    return ratios


def print_table(model_name: str, parameters: int, raw: dict, ratios: dict) -> None:
    peak = "peak_memory_bytes" in raw["full"]
    print(f"\n{model_name}: {parameters / 1e6:,.1f}M parameters")
    print(f"{'method':<24}{'step ms':>9}{'x full':>8}{'state MB':>10}{'x full':>8}"
          + (f"{'peak MB':>10}{'x full':>8}" if peak else "") + f"{'trainable':>13}")
    for name, r in raw.items():
        print(f"{name:<24}{r['median_step_s'] * 1e3:>9.1f}{ratios[name]['step']:>8.3f}"
              f"{r['optimizer_state_bytes'] / 2**20:>10.2f}{ratios[name]['state_bytes']:>8.3f}"
              + (f"{r['peak_memory_bytes'] / 2**20:>10.1f}{ratios[name]['peak_memory']:>8.3f}" if peak else "")
              + f"{r['trainable']:>13,}")
    for name, r in raw.items():
        if "penalty_bytes" in r:
            print(f"{name} keeps {r['penalty_bytes'] / 2**20:.2f} MB for its penalty "
                  f"({ratios[name]['penalty_bytes']:.3f} x full's state)")


def flat_ratios(ratios: dict) -> dict:
    """The JSON keys: {method}_step_ratio, {method}_state_bytes_ratio, {method}_peak_memory_ratio (CUDA),
    {method}_penalty_bytes_ratio (l2sp, ewc), and the element masks' state and memory ratios again as
    state_bytes_ratio_r{r} and peak_memory_ratio_r{r}."""
    flat = {f"{name}_{short}_ratio": value for name, r in ratios.items() if name != "full" for short, value in r.items()}
    for r in RATIOS:
        for short in ("state_bytes", "peak_memory"):
            if short in ratios[f"element_r{r}"]:
                flat[f"{short}_ratio_r{r}"] = ratios[f"element_r{r}"][short]
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny_bert,bert_base",
                        help=f"comma-separated, of {', '.join(MODELS)} (default: tiny_bert,bert_base)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per method (default: per model)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method first (default: per model)")
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "models": {}}
    for name in names:
        bench = MODELS[name]
        base = bench.build()
        batch = fixed_batch(base, bench.examples, bench.tokens, device)
        measure = measure_interleaved if bench.interleaved_on_cpu and device.type == "cpu" else measure_one_at_a_time
        warmup = bench.warmup if args.warmup is None else args.warmup
        repeats = args.repeats or bench.repeats
        raw = measure(bench.methods(base, device), batch, device, warmup, repeats)
        ratios = ratios_to_full(raw)
        parameters = sum(p.numel() for p in base.parameters())
        print_table(name, parameters, raw, ratios)
        result["models"][name] = {"parameters": parameters, "batch": [bench.examples, bench.tokens],
                                  "repeats": repeats, **flat_ratios(ratios), "raw": raw}
        if name == DEFAULT_MODEL:  # the keys earlier versions of this script wrote at the top level
            result |= {k: v for k, v in result["models"][name].items() if k != "raw"} | {"raw": raw}
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
