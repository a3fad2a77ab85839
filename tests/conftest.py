"""Shared fixtures. Torch-free: imports only stdlib, pytest and coordinator.broker."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from coordinator.broker import RunningBroker, find_mosquitto, start_broker


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    """A real mosquitto on 127.0.0.1 and a free port, shared by the session (16 MiB packet limit)."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    broker = start_broker("mosquitto", workdir=tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture(autouse=True)
def no_unexpected_errors(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A test fails if the code logged an ERROR it did not expect (mark it ``expect_errors`` if it does)."""
    yield
    if request.node.get_closest_marker("expect_errors"):
        return
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, "unexpected ERROR log(s): " + "; ".join(f"{r.name}: {r.getMessage()}" for r in errors[:5])
