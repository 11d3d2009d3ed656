"""How every ``anima-ft`` command reports bad input: one line on stderr and exit status 2, never a traceback.

Library code raises ``ValueError`` (bad value or file content: the message names the file, key or tensor, the value
and the fix) or ``FileNotFoundError`` (a path that does not exist). A command's ``main`` wrapped in
:func:`reports_input_errors` turns either into ``anima-ft NAME: error: MESSAGE`` and returns
:data:`INPUT_ERROR_EXIT`; every other exception (a bug, the environment) keeps its traceback. Lives below every
package so that each command module can import it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

INPUT_ERROR_EXIT = 2
"""Exit status for bad input (the same status argparse uses for a bad command line)."""


def one_line(prog: str, exc: BaseException) -> str:
    """``PROG: error: MESSAGE`` with the message's line breaks folded into spaces."""
    return f"{prog}: error: " + " ".join(str(exc).split())


def reports_input_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for a command's ``main(argv) -> int``: ``ValueError`` / ``FileNotFoundError`` -> one stderr line
    (:func:`one_line`) and the return value 2."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (ValueError, FileNotFoundError) as exc:
                print(one_line(prog, exc), file=sys.stderr, flush=True)
                return INPUT_ERROR_EXIT

        return run

    return wrap
