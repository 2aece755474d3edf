"""`maskrun-report DIR`: re-render the report of a run dir or of a sweep dir (also a crashed or partial sweep)."""

import argparse
import json
import sys
from pathlib import Path

from maskrun.report.run import print_summary, write_run_report
from maskrun.report.sweep import is_sweep_dir, print_sweep_table, write_sweep_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="maskrun-report", description=__doc__)
    parser.add_argument("dir", type=Path, help="a run dir (holds metrics.json) or a sweep dir (holds multirun.yaml)")
    path = parser.parse_args(argv).dir
    if (path / "metrics.json").is_file():
        metrics = json.loads((path / "metrics.json").read_text())
        write_run_report(path, metrics)
        print_summary(path, metrics)
    elif is_sweep_dir(path):
        print_sweep_table(path, write_sweep_report(path))
    else:
        print(f"maskrun-report: error: {path} is neither a run dir nor a sweep dir "
              "(point it at a dir holding metrics.json, or at a sweep dir holding multirun.yaml)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
