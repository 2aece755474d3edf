"""Pretraining corpora and fine-tuning tasks, read from files on disk (or, for arithmetic, generated)."""

from maskrun.data.corpus import Corpus, load_corpus
from maskrun.data.tasks import TASK_TYPES, Split, TaskData, load_task, task_type

__all__ = ["TASK_TYPES", "Corpus", "Split", "TaskData", "load_corpus", "load_task", "task_type"]
