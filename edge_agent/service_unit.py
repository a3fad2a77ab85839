"""``snake-agent install-service``: a systemd unit and the agent's config file, as text (pure; the CLI writes them).

The unit runs ``snake-agent run --config agent.toml`` as a dedicated user, restarts it on failure with a
pause (and a growing one where systemd has ``RestartSteps``, 254+), never gives up restarting (a board
whose broker is away for an hour must come back by itself), does not restart on a bad config or missing
data (exit 2-4: a restart cannot fix them), caps its memory with ``MemoryMax`` (the agent reads its
cgroup's limit as its memory budget, so the planner sees the same figure), takes secrets from an
environment file only root reads, and logs to the journal. After a reboot the agent reconnects under
the same MQTT client id with a persistent session, publishes its retained ``online`` status and a new
hello, and the coordinator plans it in again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

NO_RESTART_EXIT = (2, 3, 4)  # usage, config, data (edge_agent.exitcodes): fix the file, then restart by hand
MIN_RESTART_STEPS_SYSTEMD = 254


@dataclass(frozen=True)
class UnitSpec:
    exec_start: list[str]  # the agent command, absolute paths
    config_path: Path  # agent.toml
    env_path: Path  # the environment file with secrets ($SNAKE_MQTT_PASSWORD), may be absent
    working_dir: Path  # the agent's state directory (its cache lives under it)
    memory_max_mb: int  # MemoryMax; 0: none
    agent_id: str
    user: str | None  # the dedicated system user; None for a user unit (runs as the invoking user)
    systemd_version: int = 0  # 0: unknown (no RestartSteps, which older systemd rejects)
    restart_sec: int = 5
    restart_max_delay_s: int = 300


def render_unit(spec: UnitSpec) -> str:
    """The unit file's text."""
    command = " ".join(_quote(part) for part in [*spec.exec_start, "run", "--config", str(spec.config_path)])
    service = [
        "Type=simple",
        *([f"User={spec.user}", f"Group={spec.user}"] if spec.user else []),
        f"WorkingDirectory={spec.working_dir}",
        f"EnvironmentFile=-{spec.env_path}",
        f"ExecStart={command}",
        "Restart=on-failure",
        f"RestartSec={spec.restart_sec}s",
        *(
            ["RestartSteps=6", f"RestartMaxDelaySec={spec.restart_max_delay_s}s"]
            if spec.systemd_version >= MIN_RESTART_STEPS_SYSTEMD
            else []
        ),
        f"RestartPreventExitStatus={' '.join(str(code) for code in NO_RESTART_EXIT)}",
        "TimeoutStopSec=30s",  # SIGTERM: the agent says offline and exits
        *([f"MemoryMax={spec.memory_max_mb}M", "MemorySwapMax=0"] if spec.memory_max_mb else []),
        "StandardOutput=journal",
        "StandardError=journal",
        "SyslogIdentifier=snake-agent",
        "NoNewPrivileges=yes",
    ]
    unit = [
        f"Description=Snake Learning edge agent {spec.agent_id}",
        "Wants=network-online.target",
        "After=network-online.target time-sync.target",
        "StartLimitIntervalSec=0",  # never stop restarting: the broker may be away for long
    ]
    target = "multi-user.target" if spec.user else "default.target"
    return "\n".join(["[Unit]", *unit, "", "[Service]", *service, "", "[Install]", f"WantedBy={target}", ""])


def _quote(part: str) -> str:
    """A word of ExecStart, quoted when it holds spaces (systemd's own quoting rules)."""
    return json.dumps(part) if any(c in part for c in ' "\\') else part


def render_agent_toml(settings: Mapping[str, object]) -> str:
    """The agent's config file (``snake-agent run --config``): a flat table, keys in the given order."""
    lines = ["# snake-agent run --config FILE: keys are the option names with _ for -; flags override them.",
             "# The broker password is never here: password_file (mode 0600) or SNAKE_MQTT_PASSWORD in the env file."]  # fmt: skip
    for key, value in settings.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def default_memory_max_mb(physical_mb: int, budget_mb: int) -> int:
    """MemoryMax: the budget when one is set, else all but a quarter of the memory (at most 1 GiB) for the OS."""
    if budget_mb > 0:
        return budget_mb
    return max(physical_mb - min(physical_mb // 4, 1024), 0)


def systemd_version(text: str) -> int:
    """The version from ``systemctl --version`` output (``systemd 252 (252.38-1~deb12u1)``); 0 if unknown."""
    words = text.split()
    return int(words[1]) if len(words) > 1 and words[0] == "systemd" and words[1].isdigit() else 0
