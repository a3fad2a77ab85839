"""The message envelope and its two wire forms.

Control messages are UTF-8 JSON objects::

    {"v": 1, "type": "hello", "id": "...", "reply_to": null, "trial_id": null,
     "src": "agent-0", "dst": "coordinator", "created_at": 1732500000.0, "body": {...}}

A failed request gets a reply whose ``error`` is ``{"code": ..., "message": ...}``.

Binary data (chunks of tensor or artifact bytes) travels as a frame::

    b"SNK1" | header length (4 bytes, big endian) | header (a JSON envelope) | data

Everything is in the payload (MQTT 3.1.1 has no properties). Receivers accept any
minor addition (unknown keys are ignored) but refuse a newer major ``v``.

``decode`` raises nothing but ``ProtocolError``, whatever the bytes: JSON nesting deeper than
``MAX_DEPTH`` is refused before the parser sees it (the stdlib parser recurses), numbers must be finite
and integers fit in 64 bits (no NaN, no ``1e400``, no 400-digit integers), and the envelope's text
fields are short printable ASCII (they go into log lines and topic names).
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.protocol.errors import ProtocolError

VERSION = 1
FRAME_MAGIC = b"SNK1"
MAX_HEADER_BYTES = 64 * 1024
MAX_CONTROL_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32  # JSON nesting; our deepest message (an assign's next_holds) is 5 deep
MAX_INT = 1 << 63  # |integer| below this: 64-bit sizes, seeds and counters
MAX_NUMBER_CHARS = 40  # a float's repr is at most 24 characters
_TEXT = re.compile(r"[!-~]{1,128}")  # envelope text fields: printable ASCII, no spaces, 1..128
_ADDRESS = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # src and dst: an agent id or "coordinator" (topics.check_id)
BROADCAST = "*"  # the dst of a status
_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # removed first, so a string is then '"' [^"]* '"'
_STRING = re.compile(rb'"[^"]*"')  # linear: no escapes left, no backtracking
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Envelope:
    type: str  # a MessageType when built; decoded as read (a receiver refuses types it does not handle)
    src: str
    dst: str
    body: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    reply_to: str | None = None
    trial_id: str | None = None
    created_at: float = 0.0
    error: dict[str, str] | None = None
    v: int = VERSION
    data: bytes | None = None  # frame payload; None for control messages
    seq: int | None = None  # signed messages: the sender's sequence number (protocol/signing.py)
    sig: str | None = None  # signed messages: base64 Ed25519 signature over ``signing.signed_bytes``

    def header(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": self.v,
            "type": self.type,
            "id": self.id,
            "reply_to": self.reply_to,
            "trial_id": self.trial_id,
            "src": self.src,
            "dst": self.dst,
            "created_at": self.created_at,
        }
        if self.error is not None:
            out["error"] = self.error
        else:
            out["body"] = self.body
        if self.seq is not None:  # optional: an unsigned envelope's bytes are what they always were
            out["seq"] = self.seq
        if self.sig is not None:
            out["sig"] = self.sig
        return out


def canonical_json(obj: dict[str, Any]) -> bytes:
    """The JSON form on the wire: compact, keys sorted (the same message, the same bytes), no NaN."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def encode(env: Envelope) -> bytes:
    """Envelope -> wire bytes (JSON, or a binary frame when it carries data)."""
    head = canonical_json(env.header())
    if env.data is None:
        return head
    return FRAME_MAGIC + struct.pack(">I", len(head)) + head + env.data


def decode(payload: bytes) -> Envelope:
    """Wire bytes -> Envelope. Raises ProtocolError with a reason for anything malformed."""
    if payload[:4] == FRAME_MAGIC:
        if len(payload) < 8:
            raise ProtocolError("malformed", "frame shorter than its fixed header")
        (size,) = struct.unpack(">I", payload[4:8])
        if size > MAX_HEADER_BYTES or 8 + size > len(payload):
            raise ProtocolError("malformed", f"frame header length {size} does not fit the frame")
        return _from_header(_parse_json(payload[8 : 8 + size]), payload[8 + size :])
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError("oversize", f"control message of {len(payload)} bytes")
    return _from_header(_parse_json(payload), None)


def _parse_json(raw: bytes) -> dict[str, Any]:
    _check_depth(raw)
    try:
        obj = json.loads(
            raw.decode("utf-8"), parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("malformed", f"not a JSON envelope ({exc.__class__.__name__})") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", "envelope is not a JSON object")
    return obj


def _check_depth(raw: bytes) -> None:
    """Refuse nesting deeper than MAX_DEPTH before ``json.loads`` recurses into it (RecursionError).
    Brackets inside strings do not count; linear time whatever the bytes."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return
    codes = np.frombuffer(_STRING.sub(b"", _ESCAPE.sub(b"", raw)), np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int64) - np.isin(codes, _CLOSE).astype(np.int64)
    if steps.size and int(np.cumsum(steps).max()) > MAX_DEPTH:
        raise ProtocolError("too_deep", f"JSON nested deeper than {MAX_DEPTH}")


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise ProtocolError("bad_number", f"integer of {len(text)} digits")
    value = int(text)
    if not -MAX_INT < value < MAX_INT:
        raise ProtocolError("bad_number", "integer does not fit in 64 bits")
    return value


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise ProtocolError("bad_number", f"number of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError("bad_number", "number out of range (not finite)")
    return value


def _parse_constant(text: str) -> float:
    raise ProtocolError("bad_number", f"{text} is not JSON")


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ProtocolError("malformed", f"envelope field {key!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def _text(obj: dict[str, Any], key: str, optional: bool = False, pattern: re.Pattern[str] = _TEXT) -> Any:
    value = _field(obj, key, str, optional)
    if value is not None and not pattern.fullmatch(value) and not (key == "dst" and value == BROADCAST):
        what = "an address" if pattern is _ADDRESS else "1-128 printable ASCII characters"
        raise ProtocolError("malformed", f"envelope field {key!r} is not {what}")
    return value


def _from_header(obj: dict[str, Any], data: bytes | None) -> Envelope:
    version = _field(obj, "v", int)
    if version > VERSION:
        raise ProtocolError("version", f"protocol v{version} is newer than ours (v{VERSION}); upgrade snakelearn")
    if version < 1:
        raise ProtocolError("version", f"unknown protocol version {version}")
    error = obj.get("error")
    if error is not None and not (
        isinstance(error, dict)
        and len(error) <= 16
        and all(isinstance(v, str) and len(v) <= 4096 for v in error.values())
    ):
        raise ProtocolError("malformed", "envelope field 'error' is not a small object of strings")
    body = obj.get("body", {}) if error is None else {}
    if not isinstance(body, dict):
        raise ProtocolError("malformed", "envelope field 'body' is not an object")
    return Envelope(
        type=_text(obj, "type"),
        src=_text(obj, "src", pattern=_ADDRESS),
        dst=_text(obj, "dst", pattern=_ADDRESS),
        body=body,
        id=_text(obj, "id"),
        reply_to=_text(obj, "reply_to", optional=True),
        trial_id=_text(obj, "trial_id", optional=True),
        created_at=float(_field(obj, "created_at", (int, float))),
        error=error,
        v=version,
        data=data,
        seq=_field(obj, "seq", int, optional=True),
        sig=_text(obj, "sig", optional=True),
    )
