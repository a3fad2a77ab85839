"""The gate of the memory-capped tests: they skip where caps cannot be set, and fail there under CI."""

from __future__ import annotations

import os

import pytest

from coordinator import memcap

REQUIRE_MEMCAP = "SNAKE_REQUIRE_MEMCAP"  # .ci/run sets it to 1: a cap that cannot be set fails, never skips


def require_memcap() -> None:
    """Skip (or, with $SNAKE_REQUIRE_MEMCAP=1, fail) unless memory caps (coordinator.memcap) work here."""
    reason = memcap.available()
    if reason is None:
        return
    if os.environ.get(REQUIRE_MEMCAP) == "1":
        pytest.fail(f"memory caps unavailable here and ${REQUIRE_MEMCAP}=1: {reason}")
    pytest.skip(f"memory caps unavailable here: {reason} (set ${REQUIRE_MEMCAP}=1 to fail instead)")
