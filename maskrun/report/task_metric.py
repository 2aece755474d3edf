"""What the reports call a task's primary metric: the key of metrics.json's task.validation / task.test that the job
recorded as `task.metric` (accuracy, learning or exact_match; higher is better in every task type). Validation
chooses settings and matches methods; test is reported. Beside it, the reports show the type's other test numbers."""

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskMetric:
    key: str  # task.metric in metrics.json
    name: str  # in sentences and table headers: "validation learning 0.8123"
    axis: str  # on plot axes, where the number must say what it is
    indefinite: str  # the name with its article: "no method forgets least at an accuracy every method reaches"
    meaning: str  # what the number is, said once per report; empty where the name says it
    beside: dict[str, str]  # the type's other task.test keys, shown beside the metric: key -> name

    @property
    def validation(self) -> str:
        """Its summary.csv column on validation."""
        return f"task.validation.{self.key}"

    @property
    def test(self) -> str:
        """Its summary.csv column on test."""
        return f"task.test.{self.key}"


GENERATIVE = {"loss": "loss", "perplexity": "perplexity"}  # over the held-out task text (instruction: its responses)
ACCURACY = TaskMetric("accuracy", "accuracy", "accuracy", "an accuracy", "", {"macro_f1": "macro-F1"})
TASK_METRICS = {metric.key: metric for metric in (
    ACCURACY,
    TaskMetric("learning", "learning", "learning (drop of task loss)", "an amount of learning",
               "learning is the drop of the held-out task loss from before fine-tuning to after (higher is better)",
               GENERATIVE),
    TaskMetric("exact_match", "exact match", "exact match", "an exact-match rate",
               "exact match is the share of held-out prompts whose greedy generation is the reference response",
               GENERATIVE),
)}


def task_metric(key) -> TaskMetric:
    """The metric a job recorded as task.metric; a job that failed before its task was evaluated recorded none and is
    reported as the default task type, classification, always was."""
    return TASK_METRICS[key] if isinstance(key, str) else ACCURACY
