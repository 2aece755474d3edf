"""The cache: hit after miss, checksummed entries, killed writers, concurrent jobs, size report and prune."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from maskrun import cache_cli
from maskrun.cache import MANIFEST, Cache, open_lock, try_lock_exclusive

INPUTS = {"model": {"hidden_size": 32}, "seed": 0}


def write_artifact(out: Path) -> None:
    (out / "model.bin").write_bytes(bytes(range(256)) * 64)
    (out / "sub").mkdir()
    (out / "sub" / "config.json").write_text('{"a": 1}')


def counting_build(counter: Path, pause_s: float = 0.0):
    def build(out: Path) -> None:
        with counter.open("a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(pause_s)
        write_artifact(out)
    return build


def builds(counter: Path) -> int:
    return len(counter.read_text().split()) if counter.exists() else 0


def test_miss_then_hit_builds_once_and_records_a_checksum_per_file(tmp_path):
    cache, counter = Cache(tmp_path / "cache"), tmp_path / "builds"
    first, status1 = cache.fetch("pretrain", INPUTS, counting_build(counter))
    second, status2 = Cache(tmp_path / "cache").fetch("pretrain", INPUTS, counting_build(counter))
    assert (status1, status2, first, builds(counter)) == ("miss", "hit", second, 1)
    manifest = json.loads((first / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.bin", "sub/config.json", "inputs.json"}
    assert all(len(digest) == 64 for digest in manifest["files"].values())


def truncate(entry: Path) -> None:
    path = entry / "model.bin"
    path.write_bytes(path.read_bytes()[:100])


def edit(entry: Path) -> None:
    (entry / "sub" / "config.json").write_text('{"a": 2}')


def delete(entry: Path) -> None:
    (entry / "model.bin").unlink()


def drop_manifest(entry: Path) -> None:
    (entry / MANIFEST).unlink()


@pytest.mark.parametrize("damage", [truncate, edit, delete, drop_manifest])
def test_a_damaged_entry_is_recomputed_with_a_warning(tmp_path, caplog, damage):
    counter = tmp_path / "builds"
    entry, _ = Cache(tmp_path / "cache").fetch("pretrain", INPUTS, counting_build(counter))
    good = (entry / "model.bin").read_bytes()
    damage(entry)
    path, status = Cache(tmp_path / "cache").fetch("pretrain", INPUTS, counting_build(counter))
    assert (path, status, builds(counter)) == (entry, "miss", 2)
    assert (entry / "model.bin").read_bytes() == good
    assert "recomputing" in caplog.text and str(entry) in caplog.text
    assert not list(entry.parent.glob(".tmp-*"))


def test_the_same_job_can_refetch_an_entry_it_holds_after_damage(tmp_path):
    cache, counter = Cache(tmp_path / "cache"), tmp_path / "builds"
    entry, _ = cache.fetch("pretrain", INPUTS, counting_build(counter))
    truncate(entry)
    assert cache.fetch("pretrain", INPUTS, counting_build(counter)) == (entry, "miss")


def test_a_failed_build_leaves_no_entry_and_frees_the_lock(tmp_path):
    cache = Cache(tmp_path / "cache")

    def broken(out: Path) -> None:
        write_artifact(out)
        raise FloatingPointError("loss became nan")

    with pytest.raises(FloatingPointError):
        cache.fetch("pretrain", INPUTS, broken)
    entry = cache.entry("pretrain", INPUTS)
    assert [p.name for p in entry.parent.iterdir()] == [f"{entry.name}.lock"]
    with open_lock(entry) as lock:
        assert try_lock_exclusive(lock)  # the next job may build it at once


def fetch_in_child(root: Path, counter: Path, pause_s: float, results) -> None:
    path, status = Cache(root).fetch("pretrain", INPUTS, counting_build(counter, pause_s))
    results.put(status)


def test_a_writer_killed_mid_build_leaves_nothing_a_later_job_trusts(tmp_path):
    counter, ctx = tmp_path / "builds", multiprocessing.get_context("fork")
    writer = ctx.Process(target=fetch_in_child, args=(tmp_path / "cache", counter, 60.0, ctx.Queue()))
    writer.start()
    while builds(counter) == 0:
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    entry = Cache(tmp_path / "cache").entry("pretrain", INPUTS)
    assert not entry.exists() and list(entry.parent.glob(".tmp-*"))  # the killed writer's leftovers
    path, status = Cache(tmp_path / "cache").fetch("pretrain", INPUTS, counting_build(counter))
    assert (status, builds(counter)) == ("miss", 2)
    assert (path / "model.bin").read_bytes() == bytes(range(256)) * 64
    assert not list(entry.parent.glob(".tmp-*"))


def test_two_jobs_started_at_once_build_once(tmp_path):
    counter, ctx = tmp_path / "builds", multiprocessing.get_context("fork")
    results = ctx.Queue()
    jobs = [ctx.Process(target=fetch_in_child, args=(tmp_path / "cache", counter, 0.5, results)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
    assert sorted(results.get(timeout=5) for _ in jobs) == ["hit", "miss"]
    assert builds(counter) == 1


def age(entry: Path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(entry, (then, then))


def test_prune_removes_old_unused_entries_only(tmp_path, capsys):
    root = tmp_path / "cache"
    old, _ = Cache(root).fetch("pretrain", {"seed": 1}, write_artifact)
    recent, _ = Cache(root).fetch("pretrain", {"seed": 2}, write_artifact)
    running_job = Cache(root)
    held, _ = running_job.fetch("tokenizer", {"seed": 3}, write_artifact)
    age(old, 40)
    age(held, 40)
    (root / "pretrain" / f".tmp-{old.name}-dead1234").mkdir()  # left by a killed writer

    cache_cli.main(["--prune", "--older-than", "30", "--cache-dir", str(root)])
    assert (old.exists(), recent.exists(), held.exists()) == (False, True, True)
    assert not list(root.glob("*/.tmp-*"))
    assert "a running job holds it" in capsys.readouterr().out

    running_job.close()
    cache_cli.main(["--prune", "--older-than", "30", "--cache-dir", str(root)])
    assert not held.exists()


def test_list_reports_each_entry_and_the_total_size(tmp_path, capsys):
    root = tmp_path / "cache"
    entry, _ = Cache(root).fetch("pretrain", INPUTS, write_artifact)
    cache_cli.main(["--list", "--cache-dir", str(root)])
    out = capsys.readouterr().out
    size_kb = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) / 1024
    assert entry.name in out and "pretrain" in out
    assert f"total: 1 entries, {size_kb:.1f} KB" in out


@pytest.mark.parametrize("argv", [["--prune"], ["--prune", "--older-than", "-1"], ["--list", "--cache-dir", "/nonexistent"]])
def test_cache_command_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cache_cli.main(argv)
    assert exit_info.value.code == 2
    assert "maskrun-cache: error:" in capsys.readouterr().err
