"""What the stage CLIs share: ``--config``, ``--set``, ``--overwrite``, ``--quiet``, and logging set-up."""

from __future__ import annotations

import argparse
import logging

from rdistill.config import Config, load_config


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
