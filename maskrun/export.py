"""maskrun-export RUN_DIR --to peft [--out DIR]: a run's trainable entries as a Hugging Face PEFT adapter.

The adapter loads with `PeftModel.from_pretrained(base, DIR)` on the pretrained checkpoint (metrics.json
artifacts.pretrained, under the fine-tuned model's config: its task head's shape) and reproduces the fine-tuned model.

Format: PEFT's Super-Tuning (`SupertuningConfig`), whose Linear layers hold a flat index list and one value per
index, added onto the base weight: any set of entries. SHiRA, the other sparse format, cannot hold every mask: it
gives every targeted layer the same r·(in + out) entries and refuses more than in·out, so a matrix whose trainable
entries outnumber that (a fully trained 256×64 matrix, say) has no SHiRA form. Super-Tuning gives every targeted
layer the same share of its entries (1 − sparsity), so the share is the largest any layer needs and the other layers
are padded with frozen entries whose value is 0: exact, since a frozen entry is bit-identical to its pretrained value.

What Super-Tuning cannot hold goes in whole as `modules_to_save`, at its fine-tuned values: the task head, and every
other module with a trainable entry that is not a Linear weight (embeddings, LayerNorms, GPT-2's Conv1D, and a Linear
whose bias trains, since Super-Tuning adds to the weight only).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from maskrun.errors import ConfigError
from maskrun.masks import MASK_FILE

FORMATS = ("peft",)
EXPORT_INFO_FILE = "maskrun_export.json"  # beside the adapter: what went in sparse and what whole


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maskrun-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run dir (holding metrics.json and finetuned/)")
    parser.add_argument("--to", choices=FORMATS, required=True, help="the format to write")
    parser.add_argument("--out", type=Path, default=None, help="where to write it (default: RUN_DIR/peft)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        metrics = exportable(args.run_dir)
        out = args.out or args.run_dir / "peft"
        summary = export_peft(args.run_dir, Path(metrics["artifacts"]["pretrained"]), out)
    except ConfigError as err:
        print(f"maskrun-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}: {summary['sparse_entries']:,} entries of {len(summary['sparse'])} Linear weights sparse, "
          f"{summary['whole_entries']:,} entries of {len(summary['whole'])} modules whole")


def exportable(run_dir: Path) -> dict:
    """The run's metrics, when its fine-tuned model can be written as an adapter; else the ConfigError saying why."""
    if not (run_dir / "metrics.json").is_file():
        raise ConfigError(f"{run_dir} holds no metrics.json", "give a run dir that maskrun wrote")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    artifacts = metrics.get("artifacts") or {}
    if metrics.get("status") != "ok":
        raise ConfigError(f"{run_dir} is a failed run ({metrics.get('error')})", "rerun it, then export")
    if (metrics.get("method") or {}).get("name") == "lora":
        raise ConfigError(f"{run_dir} is a method=lora run, which wrote its PEFT adapter already",
                          f"use {run_dir / (artifacts.get('adapter') or 'adapter')}")
    if not artifacts.get("finetuned") or not (run_dir / artifacts["finetuned"]).is_dir():
        raise ConfigError(f"{run_dir} has no finetuned/ model", "rerun it with save_model=true")
    if not (run_dir / MASK_FILE).is_file():
        raise ConfigError(f"{run_dir} has no {MASK_FILE}", "give a run dir that maskrun wrote")
    if not artifacts.get("pretrained") or not Path(artifacts["pretrained"]).is_dir():
        raise ConfigError(f"the run's pretrained checkpoint {artifacts.get('pretrained')} is gone",
                          "rerun the run with the same cache_dir to restore it")
    return metrics


def load_models(finetuned_dir: Path, pretrained_dir: Path):
    """The fine-tuned model, and the pretrained checkpoint under the same task model (its head newly initialised)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(finetuned_dir)
    model_class = getattr(transformers, config.architectures[0])
    return (model_class.from_pretrained(finetuned_dir).eval(),
            model_class.from_pretrained(pretrained_dir, config=config).eval())


def trainable_positions(model: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per parameter that trains, a bool tensor of its trainable entries; a parameter the mask does not cover (the
    head, a parameter left out by mask.include/exclude) trains whole."""
    trainable = {}
    for name, param in model.named_parameters():
        entries = ~frozen[name] if name in frozen else torch.ones(param.shape, dtype=torch.bool)
        if entries.any():
            trainable[name] = entries
    return trainable


def split_modules(model: torch.nn.Module, trainable: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The Linear modules whose weight alone trains, in part (sparse), and the other modules with a trainable entry
    (whole). A Linear weight that trains whole goes whole: as sparse it would raise every layer's shared share to 1."""
    sparse, whole = [], []
    for module_name, module in model.named_modules():
        training = [name for name, _ in module.named_parameters(prefix=module_name, recurse=False) if name in trainable]
        if not training:
            continue
        weight = f"{module_name}.weight"
        if type(module) is torch.nn.Linear and training == [weight] and not trainable[weight].all():
            sparse.append(module_name)
        else:
            whole.append(module_name)
    return sparse, whole


def shared_sparsity(counts: dict[str, tuple[int, int]]) -> float:
    """The largest Super-Tuning sparsity whose per-layer entry count, int(numel · (1 − sparsity)) as PEFT computes it,
    holds every layer's trainable entries. `counts`: per layer, (trainable, numel)."""
    sparsity = max(0.0, 1.0 - max(trainable / numel for trainable, numel in counts.values()))
    while any(int(numel * (1 - sparsity)) < trainable for trainable, numel in counts.values()):
        sparsity = math.nextafter(sparsity, 0.0)  # float rounding of the product: step down to the next float
    return sparsity


def export_peft(run_dir: Path, pretrained_dir: Path, out: Path) -> dict:
    from peft import SupertuningConfig, get_peft_model

    finetuned, base = load_models(run_dir / "finetuned", pretrained_dir)
    trainable = trainable_positions(finetuned, load_file(run_dir / MASK_FILE))
    sparse, whole = split_modules(finetuned, trainable)
    if not sparse:
        raise ConfigError(f"nothing {run_dir} trains fits a sparse adapter: Super-Tuning adds to part of an "
                          f"nn.Linear's weight, and this run trains whole weights, Linear biases or other modules "
                          f"(GPT-2's Conv1D) only", f"use {run_dir / 'finetuned'} as it is")
    weights = {name: trainable[f"{name}.weight"] for name in sparse}
    sparsity = shared_sparsity({name: (int(w.sum()), w.numel()) for name, w in weights.items()})
    config = SupertuningConfig(target_modules=sparse, modules_to_save=whole or None, sparsity=sparsity,
                               base_model_name_or_path=str(pretrained_dir.resolve()))
    adapted = get_peft_model(base, config)
    with torch.no_grad():
        for name in sparse:
            layer = adapted.base_model.model.get_submodule(name)
            count = len(layer.supertuning_indices["default"])
            # the trainable entries first, then frozen ones as padding (their delta is exactly 0)
            order = torch.argsort((~weights[name]).flatten().to(torch.int8), stable=True)[:count]
            delta = (finetuned.get_submodule(name).weight - layer.get_base_layer().weight).flatten()
            layer.supertuning_indices["default"] = order.to(torch.int32)
            layer.supertuning_values["default"].copy_(delta[order])
        for name in whole:
            copy = adapted.base_model.model.get_submodule(name).modules_to_save["default"]
            copy.load_state_dict(finetuned.get_submodule(name).state_dict())
    adapted.save_pretrained(out)
    summary = {"format": "peft", "peft_type": "SUPERTUNING", "pretrained": str(pretrained_dir.resolve()),
               "sparsity": sparsity, "sparse": sparse, "whole": whole,
               "sparse_entries": sum(int(w.sum()) for w in weights.values()),
               "whole_entries": sum(p.numel() for name in whole
                                    for p in finetuned.get_submodule(name).parameters(recurse=False))}
    (out / EXPORT_INFO_FILE).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
