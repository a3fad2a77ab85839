"""MQTT topic names: built and parsed here, never formatted by hand elsewhere."""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "snake/v1"
COORDINATOR = "coordinator"  # the coordinator's address in src/dst fields
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(agent_id: str) -> str:
    """Validate an agent id: 1-64 of [A-Za-z0-9_.-] (no MQTT wildcards or separators)."""
    if not _ID.match(agent_id) or agent_id == COORDINATOR:
        raise ValueError(
            f"invalid agent id {agent_id!r}: use 1-64 letters, digits, '_', '.', '-' (not {COORDINATOR!r})"
        )
    return agent_id


def agent_status(agent_id: str) -> str:
    return f"{ROOT}/agents/{check_id(agent_id)}/status"


def agent_inbox(agent_id: str) -> str:
    return f"{ROOT}/agents/{check_id(agent_id)}/inbox"


def coordinator_inbox() -> str:
    return f"{ROOT}/coordinator/inbox"


def inbox(address: str) -> str:
    """Inbox of an address: an agent id or ``COORDINATOR``."""
    return coordinator_inbox() if address == COORDINATOR else agent_inbox(address)


def trial_state(trial_id: str) -> str:
    return f"{ROOT}/trials/{check_id(trial_id)}/state"


ALL_AGENT_STATUS = f"{ROOT}/agents/+/status"


@dataclass(frozen=True)
class Topic:
    kind: str  # "status" | "inbox" | "coordinator" | "trial"
    owner: str  # agent id, trial id or COORDINATOR


def parse(topic: str) -> Topic | None:
    """Parse one of our topics; None for anything else."""
    parts = topic.split("/")
    if len(parts) < 3 or "/".join(parts[:2]) != ROOT:
        return None
    rest = parts[2:]
    if rest == [COORDINATOR, "inbox"]:
        return Topic("coordinator", COORDINATOR)
    if len(rest) == 3 and rest[0] == "agents" and rest[2] in ("status", "inbox") and _ID.match(rest[1]):
        return Topic(rest[2], rest[1])
    if len(rest) == 3 and rest[0] == "trials" and rest[2] == "state" and _ID.match(rest[1]):
        return Topic("trial", rest[1])
    return None
