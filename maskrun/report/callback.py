"""The Hydra callback that writes the sweep report when a sweep ends (conf/config.yaml: hydra.callbacks)."""

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepReport(Callback):
    """Writes the report, shows its table, then sets the sweep's exit status: 0 if every job is ok, else 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from maskrun.report.sweep import print_sweep_table, write_sweep_report  # pandas, matplotlib: only here

        sweep_dir = Path(config.hydra.sweep.dir)
        summary = write_sweep_report(sweep_dir)
        print_sweep_table(sweep_dir, summary)
        not_ok = int((summary["status"] != "ok").sum())
        if not_ok:
            print(f"maskrun: {not_ok} of {len(summary)} jobs failed (see {sweep_dir / 'report.md'})", file=sys.stderr)
            sys.exit(1)  # SystemExit passes through Hydra's callback guard, which catches only Exception
