"""The `maskrun` command: Hydra's entry point behind an error boundary.

Bad input exits 2 with one line `maskrun: error: <what> (<how to fix>)` before any work starts;
a failure during a run exits 1 and is recorded in that run's metrics.json.
"""

import contextlib
import io
import sys

import hydra
from omegaconf import DictConfig

from maskrun.errors import ConfigError

CONFIG_MODULE = "maskrun.conf"


@hydra.main(version_base="1.3", config_path="pkg://" + CONFIG_MODULE, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from maskrun.job import run_job  # heavy imports stay off the --help path

    run_job(cfg)


def main() -> None:
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        report_error(err)
        sys.exit(2)
    hydra_main()


def report_error(err: ConfigError) -> None:
    print(f"maskrun: error: {err}", file=sys.stderr)
    for line in err.help_lines:
        print(f"  {line}", file=sys.stderr)


def check_command_line(argv: list[str]) -> None:
    """Compose every job's config and check it, so that bad input is refused before any work."""
    from hydra._internal.utils import get_args_parser

    argparse_errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(argparse_errors):
            args = get_args_parser().parse_args(argv)
    except SystemExit as exit:
        if exit.code == 0:  # --version
            raise
        reason = argparse_errors.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise ConfigError(reason, "see maskrun --help") from None
    if args.help or args.hydra_help or args.shell_completion:
        return
    from maskrun.validate import check_config, compose_jobs

    configs = compose_jobs(CONFIG_MODULE, args.config_name or "config", args.overrides, args.multirun, args.config_dir)
    if args.cfg or args.info:
        return
    for cfg in configs:
        check_config(cfg, args.multirun)
    if args.multirun:
        warn_about_sweep(configs)


def warn_about_sweep(configs: list[DictConfig]) -> None:
    """What a sweep that passed every check should still know before it starts: it runs anyway."""
    from maskrun.validate import realized_share_warnings

    for line in realized_share_warnings(configs):
        print(f"maskrun: warning: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
