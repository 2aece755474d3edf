"""The `maskrun-cache` command: how much disk the cache takes, and pruning of entries unused for a while.

    maskrun-cache --list [--cache-dir DIR]
    maskrun-cache --prune --older-than DAYS [--cache-dir DIR]

Pruning never removes an entry that a running job holds or builds (its lock is tried with timeout 0).
"""

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from maskrun.cache import Cache, Entry

DEFAULT_CACHE_DIR = "outputs/.cache"  # conf/config.yaml's cache_dir

console = Console()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="maskrun-cache", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="show every entry with its size and last use")
    action.add_argument("--prune", action="store_true", help="remove entries unused for --older-than DAYS")
    parser.add_argument("--older-than", type=float, metavar="DAYS", help="with --prune: days since an entry's last use")
    parser.add_argument("--cache-dir", type=Path, default=Path(DEFAULT_CACHE_DIR), help=f"default: {DEFAULT_CACHE_DIR}")
    args = parser.parse_args(argv)
    if args.prune and (args.older_than is None or args.older_than < 0):
        parser.error("--prune needs --older-than DAYS (a number >= 0), e.g. --older-than 30")
    if not args.cache_dir.is_dir():
        parser.error(f"{args.cache_dir} is not a cache directory (pass --cache-dir, e.g. --cache-dir outputs/.cache)")
    return args


def human_size(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def list_entries(cache: Cache) -> None:
    entries = cache.entries()
    table = Table(title=f"maskrun cache · {cache.root}")
    for column in ("stage", "key", "size", "last used (days ago)", "in use"):
        table.add_column(column)
    for entry in entries:
        table.add_row(entry.stage, entry.key, human_size(entry.size_bytes), f"{entry.age_days:.1f}",
                      "yes" if cache.is_held(entry) else "")
    console.print(table)
    for stage in sorted({e.stage for e in entries}):
        in_stage = [e for e in entries if e.stage == stage]
        console.print(f"{stage}: {len(in_stage)} entries, {human_size(sum(e.size_bytes for e in in_stage))}")
    console.print(f"total: {len(entries)} entries, {human_size(sum(e.size_bytes for e in entries))}")


def prune(cache: Cache, older_than_days: float) -> None:
    removed: list[Entry] = []
    for entry in cache.entries():
        if entry.age_days < older_than_days:
            continue
        if cache.remove_unless_held(entry):
            removed.append(entry)
        else:
            console.print(f"kept {entry.stage}/{entry.key}: a running job holds it")
    temporaries = cache.remove_stale_temporaries()
    freed = human_size(sum(e.size_bytes for e in removed))
    console.print(f"removed {len(removed)} entries ({freed}) unused for {older_than_days:g}+ days "
                  f"and {temporaries} leftovers of killed jobs")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cache = Cache(args.cache_dir)
    if args.list:
        list_entries(cache)
    else:
        prune(cache, args.older_than)


if __name__ == "__main__":
    main()
