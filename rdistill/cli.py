"""What the stage CLIs share: ``--config``, ``--set``, ``--overwrite``, ``--quiet``, and logging set-up."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rdistill.config import Config, ConfigError, load_config
from rdistill.io.outputs import RunError


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set embed.batch_size=128 (repeatable)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace what --output holds from another run")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def cli_config(args) -> Config:
    """Logging and the resolved config for a stage CLI (``--config``, ``--set``, ``--quiet``)."""
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return load_config(args.config, list(args.overrides) + (["progress=false"] if args.quiet else []))


def run_cli(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    run: Callable[[argparse.Namespace, Config], dict],
    report: Callable[[dict], None],
    overrides: Callable[[argparse.Namespace], list[str]] = lambda args: [],
) -> int:
    """Parse ``argv``, resolve the config, ``run(args, cfg)``, then ``report(summary)``. A bad config or a run that
    cannot go on prints ``error: ...`` (naming the key, file or value) and exits 2, never a traceback."""
    args = parser.parse_args(argv)
    args.overrides = list(args.overrides) + overrides(args)
    try:
        summary = run(args, cli_config(args))
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(summary)
    return 0
