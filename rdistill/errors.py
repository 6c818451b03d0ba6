"""The error policy every command shares (:func:`rdistill.cli.run_cli`).

:class:`InputError` and its subclasses are *bad input*: a file, key or value the user gave that cannot be used,
or a run that cannot go on as asked. Their message is one line that names what is wrong; a command prints it and
exits with code 2, without a traceback. Anything else is a bug in rdistill and keeps its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input: the message names the file, key or value, and says what to change."""


class ConfigError(InputError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


class RunError(InputError, RuntimeError):
    """A run that cannot go on as asked (an output in use or made from other input, a failed shard, ...)."""
