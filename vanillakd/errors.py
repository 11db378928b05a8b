"""User-facing errors: one line, no traceback, non-zero exit."""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input or files, reported as one line naming the problem."""


EXIT_USER_ERROR = 2


class RunStopped(Exception):
    """A run stopped on a signal (SIGTERM, SIGINT) after saving where it was; ``exit_code`` is 128 + the
    signal's number, as a shell reports a process ended by that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def one_line(e: UserError) -> str:
    """The message; a UserError raised in a DataLoader worker arrives wrapped in the worker's traceback text,
    whose last line is the original message."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(f"{UserError.__name__}: ", 1)[-1]


def _stacks_on_sigusr1() -> None:
    """With VANILLAKD_STACKS_ON_USR1=1, SIGUSR1 prints every thread's stack to the process's real stderr and
    the process goes on (to see where a stuck rank waits). Off by default: SIGUSR1 then ends the process, as
    a batch system's --signal=USR1 may expect."""
    stream = sys.__stderr__
    if not os.environ.get("VANILLAKD_STACKS_ON_USR1") or not hasattr(signal, "SIGUSR1") or stream is None:
        return
    try:
        faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
    except (OSError, ValueError, AttributeError):  # a stream without a file descriptor: no dumps, nothing else
        pass


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str = "vanillakd") -> int:
    """Run an entry point, turning UserError into ``prog: error: ...`` on stderr and exit code 2.

    Set VANILLAKD_TRACEBACK=1 to see the full traceback instead; with VANILLAKD_STACKS_ON_USR1=1,
    ``kill -USR1 PID`` prints where every thread of the process stands (a run that seems stuck).
    """
    _stacks_on_sigusr1()
    try:
        return main(argv) or 0
    except UserError as e:
        if os.environ.get("VANILLAKD_TRACEBACK"):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as e:  # its line, saying how to continue, is already in the log and on stderr
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
