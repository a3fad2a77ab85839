"""Process exit codes shared by both command-line tools."""

from __future__ import annotations

import enum
import signal
from types import FrameType


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the trial or agent failed at run time
    USAGE = 2  # bad command line (click's own code)
    CONFIG = 3  # bad or missing configuration file / values
    DATA = 4  # data set missing or malformed
    BROKER = 5  # broker unreachable or refused us
    INTERRUPTED = 130  # Ctrl-C, or SIGTERM


def terminate_as_interrupt() -> None:
    """Treat SIGTERM (``kill``, systemd, a supervisor) like Ctrl-C, so the same clean-up runs: brokers and
    agent processes a coordinator started are stopped, an agent says it goes offline."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
