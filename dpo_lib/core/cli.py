"""The command-line tools' common ending: a user's mistake is one line and a non-zero exit.

Every tool's ``main`` is wrapped by :func:`command`. A :class:`~dpo_lib.core.errors.UserError`
(an unknown config key, ``stage=sftt``, a data file with no usable pairs, a missing run folder or
package) prints ``<tool>: error: <message>`` on one line to stderr and exits with status 1;
``DPO_TRACEBACK=1`` shows the whole traceback instead. Anything else is a bug and keeps its
traceback (exit status 1, as Python gives). The console scripts of ``pyproject.toml``
(``dpo-train``, ``dpo-export``, ``dpo-chat``, ``dpo-app``, ``dpo-compare``, ``dpo-sweep``) call
these wrapped functions.
"""
from __future__ import annotations

import functools
import os
import sys

from .errors import UserError


def error_line(error: BaseException) -> str:
    """The message of ``error`` on one line."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split("\n")).strip() or type(error).__name__


def command(name: str):
    """Decorate a ``main(argv=None) -> int`` so that user errors end as one line and exit 1."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except UserError as error:
                if os.environ.get("DPO_TRACEBACK"):
                    raise
                print(f"{name}: error: {error_line(error)}", file=sys.stderr)
                return 1
        return run
    return wrap


def parse_run_arguments(parser, argv=None):
    """The run tools' common ending of their arguments: ``key=value`` overrides and
    ``--no-progress`` (every progress bar off, the libraries' own included), then parse."""
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_intermixed_args(argv)
    if args.no_progress:
        os.environ["DPO_PROGRESS"] = "0"
    return args
