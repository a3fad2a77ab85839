"""Writing what ``snake-agent install-service`` renders (:mod:`edge_agent.service_unit`): the unit, agent.toml and
the secrets' environment file, never over existing files unless forced."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import EdgeAgentError
from edge_agent.exitcodes import ExitCode
from edge_agent.mqtt import PASSWORD_ENV
from edge_agent.service_unit import UnitSpec, render_agent_toml, render_unit, systemd_version


class InstallError(EdgeAgentError):
    """The service files cannot be written (they exist, or a directory is not writable)."""

    exit_code = ExitCode.CONFIG


@dataclass(frozen=True)
class Layout:
    unit_path: Path
    config_path: Path
    env_path: Path
    working_dir: Path

    @classmethod
    def for_scope(cls, name: str, user_unit: bool, config_dir: Path | None, unit_dir: Path | None) -> Layout:
        if user_unit:
            home = Path.home()
            config_dir = config_dir or home / ".config" / "snakelearn"
            unit_dir = unit_dir or home / ".config" / "systemd" / "user"
            work = home / ".local" / "share" / "snakelearn"
        else:
            config_dir = config_dir or Path("/etc/snakelearn")
            unit_dir = unit_dir or Path("/etc/systemd/system")
            work = Path("/var/lib/snakelearn")
        return cls(unit_dir / f"{name}.service", config_dir / "agent.toml", config_dir / "agent.env", work)


def agent_command() -> list[str]:
    """How the unit starts this agent: the ``snake-agent`` script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("snake-agent")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edge_agent.cli"]


def local_systemd_version() -> int:
    if shutil.which("systemctl") is None:
        return 0
    try:
        out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return systemd_version(out)


def write_service(layout: Layout, spec: UnitSpec, settings: Mapping[str, object], force: bool) -> list[Path]:
    """Write the unit, agent.toml and (with a password in the environment) agent.env; the paths written."""
    password = os.environ.get(PASSWORD_ENV)
    targets = [layout.unit_path, layout.config_path, *([layout.env_path] if password else [])]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise InstallError(f"{', '.join(map(str, existing))} already exist(s); pass --force to overwrite")
    try:
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
        layout.unit_path.write_text(render_unit(spec), encoding="utf-8")
        layout.config_path.write_text(render_agent_toml(settings), encoding="utf-8")
        if password:
            fd = os.open(layout.env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as env:
                env.write(f"{PASSWORD_ENV}={password}\n")
            os.chmod(layout.env_path, 0o600)
    except OSError as exc:
        raise InstallError(f"cannot write the service files: {exc}") from exc
    return targets


def next_steps(layout: Layout, spec: UnitSpec, name: str, password_file: object = None) -> str:
    """What to run after the files are written."""
    if spec.user is None:
        return "\n".join([
            "systemctl --user daemon-reload",
            f"systemctl --user enable --now {name}",
            "loginctl enable-linger \"$USER\"   # start at boot without a login",
            f"journalctl --user -u {name} -f",
        ])  # fmt: skip
    return "\n".join([
        f"id {spec.user} >/dev/null 2>&1 || sudo useradd --system --home-dir {layout.working_dir} "
        f"--shell /usr/sbin/nologin {spec.user}",
        f"sudo install -d -o {spec.user} -g {spec.user} {layout.working_dir}",
        *([f"sudo chown {spec.user}: {password_file}   # mode 0600, readable by the agent only"] if password_file else []),
        "sudo systemctl daemon-reload",
        f"snake-agent check --config {layout.config_path}   # as {spec.user}: sudo -u {spec.user} ...",
        f"sudo systemctl enable --now {name}",
        f"journalctl -u {name} -f",
    ])  # fmt: skip
