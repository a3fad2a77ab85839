"""The agent's config file (``snake-agent run --config agent.toml``).

One flat TOML table whose keys are the long option names of ``snake-agent run`` with ``_`` for ``-``
(``broker``, ``agent_id``, ``data``, ``part``, ``cache_dir``, ``backend``, ``threads``,
``memory_budget_mb``, ``password_file``, ``log_level``, ...). Precedence, lowest first: the option's
default, the file, the environment (``SNAKE_BROKER``, ...), flags on the command line. Unknown keys
are refused by name. Relative paths in path-valued keys are taken relative to the file, so a
provisioned directory can be moved as a whole. Secrets never sit in the file: the broker password
comes from ``password_file`` (mode 0600) or ``$SNAKE_MQTT_PASSWORD``.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from edge_agent.errors import EdgeAgentError
from edge_agent.exitcodes import ExitCode

# Keys whose values are file system paths: resolved relative to the config file's directory.
PATH_KEYS = frozenset({"cache_dir", "password_file", "tls_ca", "tls_cert", "tls_key", "signing_key", "trust_dir"})
# Keys that must never hold a secret inline.
SECRET_KEYS = frozenset({"password"})


class AgentFileError(EdgeAgentError):
    """The agent config file cannot be used (missing, not TOML, unknown key, wrong type)."""

    exit_code = ExitCode.CONFIG


def read_agent_file(path: Path, known: Iterable[str]) -> dict[str, object]:
    """The file's settings as ``{key: value}``, keys checked against ``known``, paths made absolute."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AgentFileError(f"agent config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentFileError(f"agent config {path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AgentFileError(f"agent config {path}: not valid TOML: {exc}") from None
    known = set(known)
    settings: dict[str, object] = {}
    for key, value in raw.items():
        if key in SECRET_KEYS:
            raise AgentFileError(
                f"agent config {path}: key {key!r} would keep a secret in the file; "
                'use password_file = "FILE" (mode 0600) or $SNAKE_MQTT_PASSWORD'
            )
        if key not in known:
            raise AgentFileError(f"agent config {path}: unknown key {key!r}; known: {', '.join(sorted(known))}")
        if isinstance(value, (dict, list)):
            raise AgentFileError(f"agent config {path}: key {key!r} must be a single value, not a table or list")
        if key in PATH_KEYS:
            if not isinstance(value, str):
                raise AgentFileError(f"agent config {path}: key {key!r} must be a path string")
            value = str((path.parent / os.path.expanduser(value)).resolve())
        settings[key] = value
    return settings


def read_secret(path: Path) -> str:
    """A secret from a file (first line, surrounding whitespace dropped); refuses files others can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AgentFileError(f"secret file {path}: cannot read: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AgentFileError(
            f"secret file {path}: readable by others (mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}"
        )
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise AgentFileError(f"secret file {path} is empty")
    return secret


def option_keys(names: Mapping[str, str]) -> dict[str, str]:
    """File key -> click parameter name, from ``{long option: parameter name}``."""
    return {opt.lstrip("-").replace("-", "_"): name for opt, name in names.items()}
