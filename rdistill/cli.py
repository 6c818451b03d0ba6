"""What every command shares: its common flags, the config it resolves, logging, and one error policy.

Bad input (:class:`rdistill.errors.InputError`: a config key, a file, a value that cannot be used, a run that
cannot go on as asked) prints ``error: ...`` on one line naming what is wrong and exits with code 2. Anything
else is a bug and keeps its traceback: there is no catch-all.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rdistill.config import Config, load_config
from rdistill.errors import InputError


def add_common_args(p: argparse.ArgumentParser, *, upstream: bool = True) -> None:
    """``--config``, ``--set``, ``--overwrite``, ``--quiet``; and ``--allow-incomplete`` for a command that reads
    an upstream output of ours (``upstream``)."""
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set embed.batch_size=128 (repeatable)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="recompute when --output holds a result of other input or result-defining settings "
                        "(without it that is refused; a run of the same input and settings resumes)")  # fmt: skip
    if upstream:
        p.add_argument("--allow-incomplete", action="store_true",
                       help="take an upstream output of rdistill that has not finished (an embedding run without "
                            "_SUCCESS, unfinished prototypes) as it is, instead of refusing it")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def cli_config(args) -> Config:
    """Logging and the resolved config for a command (``--config``, ``--set``, ``--quiet``)."""
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
    """Parse ``argv``, resolve the config, ``run(args, cfg)``, then ``report(summary)``; exit code 0. Bad input
    prints ``error: ...`` (naming the key, file or value) and returns 2, never a traceback."""
    args = parser.parse_args(argv)
    args.overrides = list(args.overrides) + overrides(args)
    try:
        summary = run(args, cli_config(args))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(summary)
    return 0


def num_pairs_override(args) -> list[str]:
    """``--num-pairs M`` as the override ``cluster.num_pairs=M``."""
    return [] if args.num_pairs is None else [f"cluster.num_pairs={args.num_pairs}"]
