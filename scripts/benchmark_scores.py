"""Score a model preset's pretrained checkpoint on benchmarks, as a run's `before` scores are computed.

    python scripts/benchmark_scores.py model=smollm2_135m "eval.benchmarks=[hellaswag,arc_easy,piqa]" \
        eval.benchmark_limit=200

Takes maskrun's overrides. The checkpoint is the run's own cached `dequantize` entry; the scores are cached
`benchmarks` entries keyed by it (a run keys its own by its pretrained entry), on the same seeded items. Prints one line per benchmark (score ± stderr,
items, seconds) and, last, the scores as JSON.
"""

import json
import sys
import time

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from maskrun import stages
from maskrun.benchmarks.score import fetch_before
from maskrun.cache import Cache
from maskrun.dequantize import dequantize
from maskrun.models import load_pretraining_model


def main(overrides: list[str]) -> dict:
    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", overrides)
    if not cfg.model.get("gguf"):
        raise SystemExit("benchmark_scores.py: a GGUF model preset (model=smollm2_135m or model=gemma3_270m)")
    cache = Cache(cfg.cache_dir)
    checkpoint, _ = cache.fetch("dequantize", stages.dequantize(cfg.model), lambda out: dequantize(cfg.model.gguf, out))
    model = load_pretraining_model(checkpoint, "causal_lm")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    found = {}
    for name in cfg.eval.benchmarks:
        start = time.perf_counter()
        before, hit = fetch_before(cache, cfg, checkpoint, model, tokenizer, name)
        seconds = time.perf_counter() - start
        found[name] = before | {"cache": hit, "seconds": round(seconds, 1)}
        print(f"{name:14s} {before['metric']:9s} {before['score']:.3f} ± {before['stderr']:.3f}  "
              f"n={before['n']}  {seconds:.0f} s ({hit})", flush=True)
    print(json.dumps({"model": OmegaConf.to_container(cfg.model.gguf), "benchmarks": found}))
    return found


if __name__ == "__main__":
    main(sys.argv[1:])
