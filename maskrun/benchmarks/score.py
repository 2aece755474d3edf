"""Scoring a causal LM on the benchmarks with lm-eval, and forgetting as the drop of its scores after fine-tuning.

lm-eval runs offline (the data are local folders), quietly, with its own fixed seeds, on the model's device and
in batches of `eval.benchmark_batch_size`. The pretrained model's scores are a cached stage, one entry per
benchmark, so every run on the same checkpoint and benchmark settings reuses them.
"""

import contextlib
import functools
import json
import logging
import math
import os
import statistics
import sys
from pathlib import Path

import torch

from maskrun import stages
from maskrun.benchmarks import BENCHMARKS, MMLU_SPLIT, data_folders, drawn_items, package_dir
from maskrun.models import load_pretraining_model

SCORES_FILE = "scores.json"
# lm-eval's template for MMLU leaves the subject's sentence to each subject's YAML; one task over every subject
# says it from the item's own subject, in the words lm-eval's subject YAMLs use.
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"


def load_items(name: str, **_lm_eval_metadata):
    """The benchmark's split as lm-eval's custom_dataset: a DatasetDict from the package's save_to_disk folders."""
    from datasets import DatasetDict, concatenate_datasets, load_from_disk

    benchmark = BENCHMARKS[name]
    split = concatenate_datasets([load_from_disk(str(folder)) for folder in data_folders(benchmark)])
    if benchmark.answer_label:
        split = split.map(lambda doc: {"label": int(doc["answer"])})
    splits = {MMLU_SPLIT if name == "mmlu" else "validation": split}
    if name == "mmlu":  # the dev split lm-eval's MMLU task names for its shots
        dev = [Path(str(folder).replace(f"/{MMLU_SPLIT}", "/dev")) for folder in data_folders(benchmark)]
        splits["dev"] = concatenate_datasets([load_from_disk(str(folder)) for folder in dev])
    return DatasetDict(splits)


def task_config(name: str) -> dict:
    """lm-eval's own task definition of the benchmark (prompt, choices, metrics, preprocessing), over the local data."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / BENCHMARKS[name].task)
    config.pop("tag", None)
    config |= {"task": name, "dataset_path": None, "dataset_name": None, "dataset_kwargs": None,
               "custom_dataset": functools.partial(load_items, name), "training_split": None}
    if name == "mmlu":
        return config | {"test_split": MMLU_SPLIT, "fewshot_split": "dev", "description": MMLU_DESCRIPTION}
    # The scored split is lm-eval's test split, which its few-shot sampler leaves out an item's own shots from only
    # when the shots come from it too (as here, the package shipping no training split).
    return config | {"validation_split": None, "test_split": "validation", "fewshot_split": "validation"}


def quiet_offline() -> None:
    """lm-eval and datasets neither reach the network nor print progress."""
    import datasets

    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ[variable] = "1"
    datasets.disable_progress_bars()
    for logger in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(logger).setLevel(logging.ERROR)


@contextlib.contextmanager
def silent_stderr():
    """lm-eval's progress bars, which it offers no switch for, and the complaint of the `git describe` it runs to
    record a commit go nowhere; its errors still arrive as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@torch.no_grad()
def score(model, tokenizer, name: str, ecfg) -> dict:
    """One benchmark's score of a causal LM on its seeded items: {metric, score, stderr, n}."""
    quiet_offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    benchmark = BENCHMARKS[name]
    config = task_config(name)
    size = len(load_items(name)[config["test_split"]])
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=ecfg.benchmark_batch_size)
    with silent_stderr():
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[config], num_fewshot=ecfg.benchmark_fewshot,
            samples={name: drawn_items(size, ecfg.benchmark_limit)}, task_manager=TaskManager(include_defaults=False),
            log_samples=True, verbosity="ERROR")
    found = results["results"][name]
    stderr = found.get(f"{benchmark.metric}_stderr,none")
    items = {str(sample["doc_id"]): float(sample[benchmark.metric]) for sample in results["samples"][name]}
    return {"metric": benchmark.metric, "score": found[f"{benchmark.metric},none"],
            "stderr": stderr if isinstance(stderr, float) else None, "n": results["n-samples"][name]["effective"],
            "items": items}


def fetch_before(cache, cfg, pretrained_dir: Path, pretrained_lm, tokenizer, name: str) -> tuple[dict, str]:
    """The pretrained model's score on benchmark `name`, from the cache (computed on a miss)."""
    def build(out: Path) -> None:
        (out / SCORES_FILE).write_text(json.dumps(score(pretrained_lm, tokenizer, name, cfg.eval)))

    benchmark = BENCHMARKS[name]
    inputs = stages.benchmarks(cfg, pretrained_dir, name, package_dir(benchmark) / benchmark.data)
    entry, hit = cache.fetch("benchmarks", inputs, build)
    return json.loads((entry / SCORES_FILE).read_text()), hit


def benchmark_forgetting(cfg, cache, pretrained_dir: Path, finetuned_model, task, device: torch.device,
                         hits: dict) -> dict:
    """interference.benchmarks (per benchmark: metric, before, after, delta = after − before, stderr of after, n) and
    benchmark_forgetting, the mean drop (before − after; positive: forgot). The fine-tuned model is read as forgetting
    reads it (`task.pretraining_view`): a decoder's own LM, or the LM head over a fine-tuned classifier's backbone."""
    pretrained_lm = load_pretraining_model(pretrained_dir, "causal_lm").to(device)
    finetuned_lm = task.pretraining_view(pretrained_lm, finetuned_model)
    per_benchmark = {}
    for name in cfg.eval.benchmarks:
        before, hits[f"benchmarks.{name}"] = fetch_before(cache, cfg, pretrained_dir, pretrained_lm, task.tokenizer,
                                                          name)
        after = score(finetuned_lm, task.tokenizer, name, cfg.eval)
        per_benchmark[name] = {"metric": after["metric"], "before": before["score"], "after": after["score"],
                               "delta": after["score"] - before["score"], "stderr": after["stderr"],
                               "delta_stderr": paired_stderr(before["items"], after["items"]), "n": after["n"]}
    drops = [-result["delta"] for result in per_benchmark.values()]
    spread = math.sqrt(sum(result["delta_stderr"] ** 2 for result in per_benchmark.values())) / len(per_benchmark)
    return {"benchmarks": per_benchmark, "benchmark_forgetting": sum(drops) / len(drops),
            "benchmark_forgetting_stderr": spread}


def paired_stderr(before: dict[str, float], after: dict[str, float]) -> float:
    """The standard error of the mean change over the same items: the items' own difficulty cancels out, so it is
    the uncertainty of a drop, far smaller than either score's."""
    changes = [after[item] - before[item] for item in before]
    return statistics.stdev(changes) / math.sqrt(len(changes)) if len(changes) > 1 else 0.0
