"""Content-addressed store for stage artifacts: a key per input set, a lock per key, atomic publish.

An entry is a directory `<root>/<stage>/<key>/`; it appears only by a rename of a fully written
temporary directory, so a killed writer never leaves an entry that a later job trusts. Its
`manifest.json` holds the sha256 of every file, checked on each hit: an entry truncated or edited
on disk is recomputed with a warning.

Each entry has a lock file `<root>/<stage>/<key>.lock`. A job holds it shared for as long as it uses
the entry, and exclusively while it builds or replaces it: parallel jobs that need the same entry
compute it once, and `maskrun-cache --prune` skips any entry a running job holds.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VERSION = 1  # bump when an artifact's format or meaning changes
MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def cache_key(stage: str, inputs: dict) -> str:
    payload = json.dumps({"stage": stage, "version": VERSION, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (its manifest aside), by relative path."""
    digests = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            with path.open("rb") as f:
                digests[path.relative_to(directory).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def write_manifest(directory: Path) -> None:
    (directory / MANIFEST).write_text(json.dumps({"version": VERSION, "files": file_digests(directory)}, indent=2))


def entry_problem(directory: Path) -> str | None:
    """Why the entry at `directory` cannot be trusted, or None when every file matches its manifest."""
    try:
        expected = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "has no readable manifest"
    found = file_digests(directory)
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            return f"lacks {name}"
        if name not in expected:
            return f"has an unexpected file {name}"
        if found[name] != expected[name]:
            return f"has a changed {name} (checksum mismatch)"
    return None


def stale_temporaries(entry: Path) -> list[Path]:
    """Directories a writer of `entry` left behind; only safe to delete while holding its lock exclusively."""
    return sorted(entry.parent.glob(f".tmp-{entry.name}-*"))


def open_lock(entry: Path):
    # fcntl.flock rather than filelock.FileLock: a job must hold the lock *shared* while it uses the
    # entry (so that a prune skips it), and the kernel drops it when the process dies, even by kill -9.
    return open(entry.parent / f"{entry.name}.lock", "a")


def try_lock_exclusive(lock) -> bool:
    """Take the lock exclusively if nobody holds it (timeout 0)."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    size_bytes: int
    last_used: float  # seconds since the epoch: the entry dir's mtime, touched on every fetch

    @property
    def age_days(self) -> float:
        return (time.time() - self.last_used) / 86400


class Cache:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.held = {}  # entry path -> its open lock file, held shared until close() or the process ends

    def entry(self, stage: str, inputs: dict) -> Path:
        return self.root / stage / cache_key(stage, inputs)

    def fetch(self, stage: str, inputs: dict, build: Callable[[Path], None]) -> tuple[Path, str]:
        """The entry's path and "hit" or "miss"; on a miss `build(tmp_dir)` writes it first.

        The entry stays locked shared (safe from prune and replacement) until close().
        """
        path = self.entry(stage, inputs)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.held.get(path) or open_lock(path)
        self.held[path] = lock
        fcntl.flock(lock, fcntl.LOCK_SH)
        status = "hit"
        if not path.is_dir() or entry_problem(path):
            fcntl.flock(lock, fcntl.LOCK_EX)  # drops our shared hold, then waits for writers and users
            try:
                status = self.rebuild_unless_sound(path, inputs, build)
            except BaseException:
                del self.held[path]
                lock.close()  # frees the lock at once for the next job to try
                raise
            fcntl.flock(lock, fcntl.LOCK_SH)
        os.utime(path)
        return path, status

    def rebuild_unless_sound(self, path: Path, inputs: dict, build: Callable[[Path], None]) -> str:
        """Under the exclusive lock: "hit" if another job built the entry while we waited, else build it."""
        problem = entry_problem(path) if path.is_dir() else "is missing"
        if not problem:
            return "hit"
        if path.is_dir():
            log.warning("cache entry %s %s; recomputing it", path, problem)
        self.publish(path, inputs, build)
        return "miss"

    def publish(self, path: Path, inputs: dict, build: Callable[[Path], None]) -> None:
        """Build into a temporary dir, then rename it into place (replacing a bad entry). Hold the lock exclusively."""
        for stale in stale_temporaries(path):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
        old = path.parent / f".tmp-{path.name}-old-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            build(tmp)
            (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str))
            write_manifest(tmp)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Release the shared holds on the entries fetched so far."""
        for lock in self.held.values():
            lock.close()
        self.held.clear()

    def entries(self) -> list[Entry]:
        """Every published entry, oldest use first."""
        found = []
        for path in self.root.glob("*/*"):
            if path.is_dir() and not path.name.startswith("."):
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                found.append(Entry(path.parent.name, path.name, path, size, path.stat().st_mtime))
        return sorted(found, key=lambda e: e.last_used)

    def remove_unless_held(self, entry: Entry) -> bool:
        """Delete the entry unless a running job holds or builds it; True when it was removed."""
        with open_lock(entry.path) as lock:
            if not try_lock_exclusive(lock):
                return False
            doomed = entry.path.parent / f".tmp-{entry.key}-old-{uuid.uuid4().hex[:8]}"
            entry.path.rename(doomed)  # the entry vanishes at once, never half-deleted
            shutil.rmtree(doomed)
            for stale in stale_temporaries(entry.path):
                shutil.rmtree(stale, ignore_errors=True)
        return True

    def is_held(self, entry: Entry) -> bool:
        with open_lock(entry.path) as lock:
            return not try_lock_exclusive(lock)

    def remove_stale_temporaries(self) -> int:
        """Delete what killed writers left behind (skipping keys being built now); the number of dirs removed."""
        removed = 0
        for stage_dir in self.root.glob("*/"):
            keys = {tmp.name.split("-")[1] for tmp in stage_dir.glob(".tmp-*-*")}
            for key in sorted(keys):
                with open_lock(stage_dir / key) as lock:
                    if not try_lock_exclusive(lock):
                        continue
                    for stale in stale_temporaries(stage_dir / key):
                        shutil.rmtree(stale, ignore_errors=True)
                        removed += 1
        return removed
