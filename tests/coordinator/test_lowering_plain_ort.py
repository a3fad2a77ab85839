"""The portable tier (tests/portable) passes on plain onnxruntime, in another environment.

Plain onnxruntime and onnxruntime-training cannot share an environment. This test
writes the case directory here and runs tests/portable with a plain-onnxruntime
interpreter: $SNAKELEARN_PORTABLE_PYTHON, or .venv-portable/bin/python in the
repository (``SNAKE_VENV=.venv-portable bash tools/setup.sh agent-portable`` plus
pytest). Without one it skips; CI can run the two steps itself (see tests/portable/layout.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.portable.layout import ENV_CASES, ENV_PYTHON

pytestmark = [pytest.mark.ort, pytest.mark.torch, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _portable_python() -> Path:
    given = os.environ.get(ENV_PYTHON)
    candidate = Path(given) if given else REPO / ".venv-portable" / "bin" / "python"
    if not candidate.is_file():
        pytest.skip(f"no plain-onnxruntime interpreter: set ${ENV_PYTHON} or create .venv-portable")
    return candidate


def _runs(python: Path, code: str) -> bool:
    return subprocess.run([str(python), "-c", code], capture_output=True, timeout=120).returncode == 0


def test_portable_tier_passes_on_plain_onnxruntime(portable_cases: Path) -> None:
    python = _portable_python()
    assert _runs(python, "import onnxruntime"), f"{python} has no onnxruntime"
    assert not _runs(python, "import torch"), f"{python} has torch: not a portable environment"
    assert not _runs(python, "import onnxruntime.training.api"), f"{python} has onnxruntime-training"
    env = {**os.environ, ENV_CASES: str(portable_cases)}
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "portable", "tests/portable"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    sys.stdout.write(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout and " skipped" not in done.stdout
