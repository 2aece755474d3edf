"""Task types: what fine-tuning trains and what it is scored by.

A task type is one module here and one line in TASK_TYPES; a dataset's YAML names its type
(`task_type`, see maskrun.data.tasks). Each module's `build(data, tokenizer, max_length, ecfg)` returns a
maskrun.tasks.base.TaskType, which decides

- the model: the pretrained checkpoint under the task's head (`load_model`);
- the batches and the loss: `examples` of a split, `collate`d into the model's arguments with `labels`;
- the metrics: `evaluate` on validation or test, `METRIC` the one that is chosen on;
- how forgetting reads the fine-tuned model (`pretraining_view`).

    classification  a new head on the backbone; accuracy, macro-F1
    causal_lm       the checkpoint's own LM; held-out loss, perplexity, learning (drop of the loss)
    instruction     the checkpoint's own LM, loss on the response; loss, perplexity, exact match
"""

from maskrun.tasks import causal_lm, classification, instruction

TASK_TYPES = {
    "classification": classification,
    "causal_lm": causal_lm,
    "instruction": instruction,
}


def build_task(data, tokenizer, max_length: int, ecfg):
    """The task type of `data` (a maskrun.data.TaskData), ready to be asked."""
    return TASK_TYPES[data.task_type].build(data, tokenizer, max_length, ecfg)
