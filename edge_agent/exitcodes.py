"""Process exit codes, the exception root they hang on, and the one guard both command-line tools use."""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import ClassVar

import click


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the trial or agent failed at run time
    USAGE = 2  # bad command line (click's own code)
    CONFIG = 3  # bad or missing configuration file / values
    DATA = 4  # data set missing or malformed
    BROKER = 5  # broker unreachable or refused us
    INTERRUPTED = 130  # Ctrl-C, or SIGTERM


class ToolError(Exception):
    """An error a tool raises on purpose: its message is the reason a user reads, its class says the exit code.

    Each tool has one root below this (``EdgeAgentError``, ``CoordinatorError``); a subclass that means
    something else than "failed" sets ``exit_code``.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED


def terminate_as_interrupt() -> None:
    """Treat SIGTERM (``kill``, systemd, a supervisor) like Ctrl-C, so the same clean-up runs: brokers and
    agent processes a coordinator started are stopped, an agent says it goes offline."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@contextlib.contextmanager
def exit_guard(log: logging.Logger) -> Iterator[None]:
    """Run a command's body and leave the process with the documented exit code.

    SIGTERM acts as Ctrl-C; both exit 130 after the body's clean-up ran. A :class:`ToolError` logs one
    line (its code's name and its message; the traceback too at DEBUG) and exits with its class's code.
    Anything else is a bug: it is logged with its traceback and exits 1. Click's usage errors pass
    through (click exits 2).
    """
    terminate_as_interrupt()
    try:
        yield
    except KeyboardInterrupt:
        # the clean-up ran: a second SIGTERM/Ctrl-C while the process exits must not turn exit 130 into
        # death by signal (seen once in CI: -2, after "interrupted" was logged)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.error("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException:
        raise
    except ToolError as exc:
        log.error("%s: %s", exc.exit_code.name.lower(), exc, exc_info=log.isEnabledFor(logging.DEBUG))
        sys.exit(exc.exit_code)
    except Exception:
        log.exception("unexpected error (a bug: please report it with this traceback)")
        sys.exit(ExitCode.FAILED)
