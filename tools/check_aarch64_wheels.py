"""Does the portable agent's dependency set resolve to binary wheels for a Raspberry Pi / Jetson?

Runs ``pip download --only-binary=:all: --platform P --python-version V --dest TMP REQS`` for
each platform tag and Python version (PyPI; nothing is installed) and writes, per platform
and version, whether it resolved and which wheel files it chose. REQS are the
``agent-portable`` extra's requirements (onnxruntime>=1.17,<2, numpy, paho-mqtt,
safetensors, click, cryptography). Example::

    python tools/check_aarch64_wheels.py --out /tmp/aarch64.json

Two targets by default, named by the newest glibc they assume: ``glibc2.17`` (the
brief's ``--platform manylinux2014_aarch64`` alone) and ``glibc2.28`` (Raspberry Pi OS
bookworm, JetPack 5/6: every manylinux tag up to manylinux_2_28, each passed as its own
``--platform``, since pip takes a custom platform tag literally). onnxruntime's aarch64
wheels since 1.17 are tagged manylinux_2_27/2_28, so the first target finds none >= 1.17.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("check_aarch64_wheels")

PACKAGES = (
    "onnxruntime>=1.17,<2",
    "numpy>=1.26,<3",
    "paho-mqtt>=2.1,<3",
    "safetensors>=0.4,<1",
    "click>=8.1,<9",
    "cryptography==50.0.2",
)
PYTHONS = ("3.11", "3.12", "3.13")
TARGETS = {  # name: platform tags pip may pick wheels for
    "glibc2.17": ("manylinux2014_aarch64",),
    "glibc2.28": ("manylinux2014_aarch64", *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 29))),
}


def check(python_version: str, packages: tuple[str, ...], tags: tuple[str, ...], timeout: float) -> dict[str, Any]:
    """One ``pip download`` into a scratch directory: ok/failed, wheel file names, pip's last words on failure."""
    with tempfile.TemporaryDirectory(prefix="aarch64-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
        for tag in tags:
            command += ["--platform", tag]
        command += ["--python-version", python_version, "--dest", scratch, *packages]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"pip download timed out after {timeout:.0f} s", "wheels": []}
        wheels = sorted(p.name for p in Path(scratch).iterdir())
        result: dict[str, Any] = {
            "status": "ok" if done.returncode == 0 else "failed",
            "wheels": wheels,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip() and "is ignored" not in line]
            result["error"] = "\n".join(lines[-5:])
        return result


def run(targets: list[str], pythons: list[str], packages: list[str], timeout: float) -> dict[str, Any]:
    report: dict[str, Any] = {
        "packages": packages,
        "checked_on": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "targets": {name: {"platform_tags": list(TARGETS[name]), "pythons": {}} for name in targets},
    }
    for name in targets:
        for version in pythons:
            result = check(version, tuple(packages), TARGETS[name], timeout)
            report["targets"][name]["pythons"][version] = result
            logger.info("%s, Python %s: %s %s", name, version, result["status"], " ".join(result["wheels"]))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--pythons", nargs="+", default=list(PYTHONS), help="Python versions to check")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS), help="platforms")
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help="requirements to resolve")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pip download")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = run(args.targets, args.pythons, args.packages, args.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    statuses = [r["status"] for target in report["targets"].values() for r in target["pythons"].values()]
    return 0 if "ok" in statuses else 1


if __name__ == "__main__":
    sys.exit(main())
