"""What produced a result: library versions and the maskrun source commit, recorded in metrics.json."""

import subprocess
from importlib.metadata import version
from pathlib import Path

import maskrun


def git_commit() -> str | None:
    """The commit of the maskrun checkout this code runs from; None for an installed copy or without git."""
    source_root = Path(maskrun.__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=source_root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.split()
    # An installed copy may sit inside some other repository (e.g. a venv in a checkout): not ours.
    if result.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != source_root:
        return None
    return lines[1]


def versions() -> dict:
    """`source` fingerprints the maskrun code a job runs (maskrun.stages): it changes with any edit, committed or not."""
    from maskrun.stages import STAGE_CODE, code_fingerprint

    return {"maskrun": maskrun.__version__, "torch": version("torch"), "transformers": version("transformers"),
            "peft": version("peft"), "git_commit": git_commit(), "source": code_fingerprint(STAGE_CODE["result"])}
