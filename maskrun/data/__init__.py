"""Pretraining corpora and fine-tuning tasks, read from files on disk."""

from maskrun.data.corpus import Corpus, load_corpus
from maskrun.data.tasks import TaskData, load_task

__all__ = ["Corpus", "TaskData", "load_corpus", "load_task"]
