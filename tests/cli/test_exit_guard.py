"""The guard both CLIs share: an error's class says the exit code; Ctrl-C is 130; a bug is 1 with its traceback."""

from __future__ import annotations

import logging
import signal

import click
import pytest

from coordinator.broker import BrokerError
from coordinator.errors import ConfigError, CoordinatorError, TrialError
from coordinator.plan import PlanError
from edge_agent.data import DataError
from edge_agent.errors import EdgeAgentError, LinkError
from edge_agent.exitcodes import ExitCode, ToolError, exit_guard

log = logging.getLogger("test.exitcodes")


@pytest.fixture(autouse=True)
def restore_signals() -> object:
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _exit_code(exc: BaseException) -> int | str | None:
    with pytest.raises(SystemExit) as exited, exit_guard(log):
        raise exc
    return exited.value.code


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (EdgeAgentError, ExitCode.FAILED),
        (CoordinatorError, ExitCode.FAILED),
        (TrialError, ExitCode.FAILED),
        (ConfigError, ExitCode.CONFIG),
        (PlanError, ExitCode.CONFIG),
        (DataError, ExitCode.DATA),
        (LinkError, ExitCode.BROKER),
        (BrokerError, ExitCode.BROKER),
    ],
)
@pytest.mark.expect_errors
def test_each_error_class_carries_its_exit_code(
    error: type[ToolError], code: ExitCode, caplog: pytest.LogCaptureFixture
) -> None:
    assert _exit_code(error("the reason")) == code
    (record,) = caplog.records  # one line, no traceback at INFO
    assert record.getMessage() == f"{code.name.lower()}: the reason" and not record.exc_info


@pytest.mark.expect_errors
def test_the_traceback_is_logged_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=log.name):
        _exit_code(DataError("missing"))
    assert caplog.records[-1].exc_info


@pytest.mark.expect_errors
def test_interrupts_exit_130_and_bugs_exit_1_with_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert _exit_code(KeyboardInterrupt()) == ExitCode.INTERRUPTED
    # once interrupted, the exit is not interrupted again (a second SIGTERM would end it by signal)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN == signal.getsignal(signal.SIGINT)
    assert _exit_code(ZeroDivisionError("oops")) == ExitCode.FAILED
    assert caplog.records[-1].exc_info and "bug" in caplog.records[-1].getMessage()


@pytest.mark.expect_errors
def test_sigterm_inside_the_guard_is_an_interrupt() -> None:
    with pytest.raises(SystemExit) as exited, exit_guard(log):
        signal.raise_signal(signal.SIGTERM)
    assert exited.value.code == ExitCode.INTERRUPTED


def test_click_usage_errors_pass_through_to_click() -> None:
    with pytest.raises(click.BadParameter), exit_guard(log):
        raise click.BadParameter("bad")
