"""The portable tier: tests that must pass on plain onnxruntime, without torch or onnxruntime-training.

They read a case directory written in the main environment (tests/portable/layout.py,
``python -m tests.coordinator.portable_cases --out DIR``) through the ``portable_cases``
fixture of tests/conftest.py: ``$SNAKELEARN_PORTABLE_CASES`` or, in the main environment,
written on the fly. Only numpy, onnxruntime and our torch-free edge_agent are imported.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/portable/" in item.nodeid:
            item.add_marker(pytest.mark.portable)
