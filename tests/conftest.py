"""Shared fixtures. Torch-free at import: stdlib, pytest, coordinator.broker, tests.portable.layout."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker import RunningBroker, find_mosquitto, start_broker
from tests.portable.layout import ENV_CASES


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


@pytest.fixture(scope="session")
def portable_cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The portable case directory (tests/portable/layout.py): $SNAKELEARN_PORTABLE_CASES, or written here.

    Writing one needs onnxruntime-training and torch (imported only then); without them and
    without the variable, the tests that need cases skip.
    """
    given = os.environ.get(ENV_CASES)
    if given:
        if not (Path(given) / "ops" / "index.json").is_file():
            pytest.fail(f"${ENV_CASES}={given} is not a portable case directory")
        return Path(given)
    pytest.importorskip("torch", reason=f"set ${ENV_CASES} (python -m tests.coordinator.portable_cases --out DIR)")
    from edge_agent.ort_training import OrtUnavailableError, training_module

    try:
        training_module("api")
    except OrtUnavailableError:
        pytest.skip(f"no onnxruntime-training to write cases; set ${ENV_CASES}")
    from tests.coordinator.portable_cases import export_models, write_cases

    forward_of = export_models(tmp_path_factory.mktemp("portable-exports"))
    return write_cases(tmp_path_factory.mktemp("portable-cases"), forward_of, tmp_path_factory.mktemp("portable-cache"))
