"""Content-addressed store for stage artifacts: a key per input set, a lock per key, atomic publish.

An entry is a directory `<root>/<stage>/<key>/`; it appears only by a rename of a fully written
temporary directory, so a killed writer never leaves an entry that a later job trusts. Parallel
jobs that need the same entry take its file lock: one computes, the others wait and then hit.
"""

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

VERSION = 1  # bump when an artifact's format or meaning changes


def cache_key(stage: str, inputs: dict) -> str:
    payload = json.dumps({"stage": stage, "version": VERSION, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class Cache:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def entry(self, stage: str, inputs: dict) -> Path:
        return self.root / stage / cache_key(stage, inputs)

    def fetch(self, stage: str, inputs: dict, build: Callable[[Path], None]) -> tuple[Path, str]:
        """The entry's path and "hit" or "miss"; on a miss `build(tmp_dir)` writes it first."""
        path = self.entry(stage, inputs)
        if path.is_dir():
            return path, "hit"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.is_dir():
                return path, "hit"  # another job built it while we waited
            tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                build(tmp)
                (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
                tmp.rename(path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return path, "miss"
