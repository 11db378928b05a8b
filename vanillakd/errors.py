"""User-facing errors: one line, no traceback, non-zero exit."""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input or files, reported as one line naming the problem."""


EXIT_USER_ERROR = 2


def one_line(e: UserError) -> str:
    """The message; a UserError raised in a DataLoader worker arrives wrapped in the worker's traceback text,
    whose last line is the original message."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(f"{UserError.__name__}: ", 1)[-1]


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str = "vanillakd") -> int:
    """Run an entry point, turning UserError into ``prog: error: ...`` on stderr and exit code 2.

    Set VANILLAKD_TRACEBACK=1 to see the full traceback instead.
    """
    try:
        return main(argv) or 0
    except UserError as e:
        if os.environ.get("VANILLAKD_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
