"""One run: pretrain → mask generation → fine-tune by the chosen method → evaluate, each stage through the cache.

What the task trains and is scored by is its task type's (maskrun.tasks); how fine-tuning is constrained is the
method's (maskrun.methods).
"""

import json
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoTokenizer

from maskrun import stages
from maskrun.benchmarks.score import benchmark_forgetting
from maskrun.cache import Cache
from maskrun.checkpoint import CHECKPOINT_DIR, Checkpointing
from maskrun.controls import run_controls
from maskrun.data import load_corpus, load_task
from maskrun.data.tokenizer import prepare_tokenizer
from maskrun.dequantize import dequantize, read_source
from maskrun.devices import resolve_device
from maskrun.distributed import Processes
from maskrun.evaluate import interference
from maskrun.finetune import Callback, finetune
from maskrun.masks import (MASK_FILE, build_mask, eligible_parameters, mask_summary, moving_mask, needs_scores,
                           neuron_axes, read_tied_share, save_mask, selection_record, write_mask)
from maskrun.masks.selection_pass import read_record, run_selection_pass, write_records
from maskrun.masks.scores import compute_scores, read_scores, write_scores
from maskrun.methods import build_method, dial
from maskrun.methods.base import Context, trainable_entries
from maskrun.models import head_summary, pretrained_names, pretrained_source, pretraining_objective, torch_dtype
from maskrun.posthoc import posthoc_curve
from maskrun.pretrain import pretrain
from maskrun.sequential import fine_tune_next
from maskrun.tasks import build_task


def run(cfg, cache: Cache, run_dir: Path, metrics: dict, log_pretrain_step: Callable[[dict], None] | None = None,
        callbacks: Sequence[Callback] = ()) -> None:
    """Runs the arrow for `cfg`, filling `metrics` stage by stage (so a failure keeps what was done);
    `log_pretrain_step` sees the pretraining steps (when pretraining runs) and `callbacks` watch fine-tuning: what
    a job's trackers log (maskrun.loggers), which compute nothing of its results.

    One rank of a job of several processes runs it too (maskrun.distributed): rank 0 alone writes the run's files.
    """
    device = resolve_device(cfg.device)
    processes = Processes(cfg.strategy)
    timing, hits = metrics.setdefault("timing", {}), metrics.setdefault("cache", {})
    metrics["device"] = str(device)
    metrics["cpu_threads"] = torch.get_num_threads()  # float sums, hence the last bits, depend on it
    corpus = load_corpus(cfg.dataset)
    data = load_task(cfg.dataset, cfg.dataset.split_seed)
    dtype = torch_dtype(cfg.model)

    local_model = cfg.model  # what the stages load: for a GGUF checkpoint, its dequantized entry in its place
    if cfg.model.get("gguf"):
        with stage_timer(timing, "dequantize"):
            checkpoint_dir, hits["dequantize"] = cache.fetch("dequantize", stages.dequantize(cfg.model),
                                                             lambda out: dequantize(cfg.model.gguf, out))
        metrics["model_source"] = read_source(checkpoint_dir)
        local_model = OmegaConf.merge(cfg.model, {"gguf": None, "name_or_path": str(checkpoint_dir)})

    with stage_timer(timing, "tokenizer"):
        tokenizer_dir, hits["tokenizer"] = cache.fetch(
            "tokenizer", stages.tokenizer(cfg),
            lambda out: prepare_tokenizer(pretrained_source(local_model), corpus.train, cfg.model.get("vocab_size"), out,
                                          cfg.model.family))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        task = build_task(data, tokenizer, cfg.finetune.max_length, cfg.eval)

    with stage_timer(timing, "pretrain"):
        pretrained_dir, hits["pretrain"] = cache.fetch(
            "pretrain", stages.pretrain(cfg, tokenizer_dir),
            lambda out: pretrain(local_model, cfg.pretrain, corpus.train, tokenizer_dir, out, device, cfg.seed,
                                 log_pretrain_step))
        metrics["artifacts"] = {"pretrained": str(pretrained_dir.resolve()), "mask": MASK_FILE, "finetuned": None,
                                "adapter": None}

    def fetch_scores(score: str) -> tuple[Path, str]:
        """The cached scores entry of kind `score`, computed with the mask group's calibration settings."""
        mcfg = OmegaConf.merge(cfg.mask, {"score": score})
        return cache.fetch("scores", stages.scores(cfg, mcfg, pretrained_dir), lambda out: write_scores(
            compute_scores(mcfg, pretrained_dir, task, device, cfg.seed, dtype), out))

    with stage_timer(timing, "scores"):
        scores_dir, hits["scores"] = fetch_scores(cfg.mask.score) if needs_scores(cfg.mask) else (None, "skipped")

    record = selection_record(cfg.mask)
    if record:  # lt_sft, movement: the mask's scores are a record of a short fine-tuning pass, its own cached stage
        with stage_timer(timing, "selection"):
            scores_dir, hits["selection"] = cache.fetch(
                "selection", stages.selection(cfg, pretrained_dir),
                lambda out: write_records(run_selection_pass(cfg.mask, cfg.finetune, cfg.optimizer, pretrained_dir,
                                                             pretrained_names(pretrained_dir), task, device, cfg.seed,
                                                             dtype), out))

    def mask_scores() -> dict[str, torch.Tensor] | None:
        return read_record(scores_dir, record) if record else scores_dir and read_scores(scores_dir)

    with stage_timer(timing, "mask"):
        torch.manual_seed(cfg.seed)  # the new head's initialisation must not depend on which stages were cache hits
        model = task.load_model(pretrained_dir, dtype).to(device)
        params = eligible_parameters(model, pretrained_names(pretrained_dir), cfg.mask.include, cfg.mask.exclude)
        mask_dir, hits["mask"] = cache.fetch(
            "mask", stages.mask(cfg, pretrained_dir, scores_dir, params),
            lambda out: write_mask(build_mask(cfg.mask, params, mask_scores(), cfg.seed,
                                              neuron_axes(model, params)), out))
        if processes.is_main:
            shutil.copyfile(mask_dir / MASK_FILE, run_dir / MASK_FILE)
        frozen, tied_share = load_file(mask_dir / MASK_FILE), read_tied_share(mask_dir, cfg.mask.strategy)
        metrics["mask"] = mask_summary(cfg.mask, frozen, tied_share) | head_summary(model, pretrained_names(pretrained_dir))

    def method_scores(score: str) -> dict[str, torch.Tensor]:
        entry, hits["method_scores"] = fetch_scores(score)
        return read_scores(entry)

    with stage_timer(timing, "method"):  # what the method builds before training (ewc's Fisher, lora's adapters)
        method = build_method(cfg, Context(cfg, pretrained_dir, run_dir, tokenizer, corpus, device, method_scores))
        model_entries = sum(p.numel() for p in model.parameters())
        task.start(model, device)  # what learning is measured from (the pretrained model's task loss)
        model = method.prepare(model)
        metrics["method"] = {"name": cfg.method.name, **method.record(), "dial": dial(cfg),
                             "trainable": trainable_entries(model, frozen), "model_entries": model_entries}
        del frozen  # while fine-tuning, the optimizer's packed copy of the mask is the only one resident

    with stage_timer(timing, "finetune"):
        moving = moving_mask(cfg.mask, model, list(params), cfg.seed)  # None unless the mask moves while training
        # FSDP's sharded state is not checkpointed (yet): validate refuses finetune.checkpoint_every with it
        checkpointing = Checkpointing(None if processes.strategy == "fsdp" else run_dir / CHECKPOINT_DIR,
                                      cfg.finetune.checkpoint_every, stages.hash_config(cfg), method.generators())
        trained = processes.wrap(model, load_file(mask_dir / MASK_FILE))
        history = finetune(trained, task, mask_dir / MASK_FILE, cfg.finetune, cfg.optimizer, device, cfg.seed,
                           method.extra_loss, callbacks=[*callbacks] + ([moving] if moving else []),
                           checkpointing=checkpointing, processes=processes)
        processes.gather(trained, model)
        if not processes.is_main:  # the other ranks' part ends with fine-tuning
            return
        metrics["finetune"] = {"lr": float(cfg.finetune.lr), "resumed_from_step": checkpointing.resumed_from_step}
        if moving:  # the run's mask: the entries frozen at every step
            frozen = moving.frozen_throughout()
            save_mask(frozen, run_dir / MASK_FILE)
            metrics["mask"] |= mask_summary(cfg.mask, frozen, tied_share) | moving.record(pretrained_dir / "model.safetensors")
        model = method.finish(model)
        metrics["artifacts"] |= method.artifacts()
        metrics["memory"] = {"optimizer_state_bytes": history.pop("optimizer_state_bytes")}
        if moving:  # what a moving mask keeps resident while training counts too
            metrics["memory"]["moving_mask_bytes"] = moving.resident_bytes()
            metrics["memory"]["optimizer_state_bytes"] += metrics["memory"]["moving_mask_bytes"]
        (run_dir / "history.json").write_text(json.dumps(history))

    with stage_timer(timing, "evaluate"):
        metrics["task"] = task.record() | {"validation": history["selected"], "test": task.evaluate(model, "test", device)}
        metrics["interference"] = interference(
            pretrained_dir, model, task, corpus, cfg.eval.heldout_texts,
            pretraining_objective(cfg.model, cfg.pretrain), cfg.pretrain.max_length, device, cfg.eval.batch_size)
        if cfg.eval.benchmarks:  # forgetting on standard benchmarks (maskrun.benchmarks)
            metrics["interference"] |= benchmark_forgetting(cfg, cache, pretrained_dir, model, task, device, hits)

    if cfg.eval.posthoc_reset:  # the run's mask strategy at other ratios, applied to the fine-tuned deltas
        with stage_timer(timing, "posthoc"):
            metrics["posthoc"] = posthoc_curve(cfg, cache, model, task, corpus, pretrained_dir, scores_dir, mask_scores(),
                                               load_file(run_dir / MASK_FILE), device)

    if cfg.eval.controls:
        with stage_timer(timing, "controls"):
            metrics["controls"], control_hits = run_controls(
                cache, cfg, pretrained_dir, tokenizer_dir, task, metrics["task"]["test"], device)
            hits.update(control_hits)

    if cfg.save_model:  # the model of this run's mask, before any sequential task moves it
        model.save_pretrained(run_dir / "finetuned")
        tokenizer.save_pretrained(run_dir / "finetuned")
        metrics["artifacts"]["finetuned"] = "finetuned"

    if cfg.sequential.dataset:
        with stage_timer(timing, "sequential"):
            metrics["sequential"] = fine_tune_next(model, task, load_file(run_dir / MASK_FILE), tied_share,
                                                   pretrained_dir, cfg, device, run_dir)


@contextmanager
def stage_timer(timing: dict, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = round(time.perf_counter() - start, 3)
