"""Rich progress bars for the stages: step, loss, elapsed and ETA."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class StageProgress:
    """One progress bar for one stage; silent when stderr is not a terminal (logs, CI, pool workers)."""

    def __init__(self, stage: str, total: int):
        self.progress = Progress(
            TextColumn(f"[bold]{stage:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
            transient=False,
        )
        self.task = self.progress.add_task(stage, total=total, status="")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def advance(self, steps: int = 1, **status: float) -> None:
        text = " ".join(f"{k} {v:.4f}" for k, v in status.items())
        self.progress.update(self.task, advance=steps, status=text)
