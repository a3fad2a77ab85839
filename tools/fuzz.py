"""A seeded fuzzer: malformed payloads from a foreign MQTT client into every inbox and status topic.

    python -m tools.fuzz --broker mqtt://127.0.0.1:1883 --seed 1 --count 10000 --out fuzz.json

It subscribes to ``snake/#`` (to find agents and to capture real messages for replays) and publishes,
at most ``--rate`` per second, payloads of these families (``FAMILIES``):

- ``random_bytes``   random bytes, some starting like JSON or like a frame
- ``deep_nesting``   ``[[[[...`` and ``{"a":{"a":...`` up to 200 KB (the stdlib JSON parser recurses)
- ``numbers``        400- and 5000-digit integers, ``1e999``, ``NaN``, ``Infinity`` in envelope and body fields
- ``wrong_type``     a well-formed message of every type in ``edge_agent.protocol.messages`` with exactly one
                     envelope or body field (nested ones too) of a wrong type, or negative where it cannot be
- ``unknown_type``   envelopes of types nobody handles
- ``newer_version``  ``v`` of 2 (and 0, -1, huge)
- ``foreign_trial``  real messages seen earlier, under a new id and another trial's id
- ``lying_frame``    ``SNK1`` frames whose header length lies (too long, too short, huge, zero)
- ``chunk_range``    chunk frames with seq/count out of range or a digest that does not match
- ``absurd_size``    chunk frames declaring absurd transfer sizes; a control message over 4 MiB (rarely)
- ``replay``         real messages seen earlier, verbatim, to their own topic or another inbox

Nothing it sends is a valid command a receiver would act on (it never forges a well-formed
hello, assign, abort, shutdown, error or a complete transfer: that is impersonation, which
signatures stop, not parsing). Status topics get non-retained publishes only, so no garbage
outlives the trial. The generator (``Fuzzer``) is pure and seeded, so unit tests feed the same
payloads straight to ``Agent.handle`` and ``Controller.handle``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import struct
import sys
import threading
import time
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Union

from edge_agent.protocol import messages, topics
from edge_agent.protocol.envelope import FRAME_MAGIC, MAX_CONTROL_BYTES, Envelope, canonical_json, decode, new_id
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.kinds import MessageType, Purpose

log = logging.getLogger("tools.fuzz")
FAMILIES = (
    "random_bytes", "deep_nesting", "numbers", "wrong_type", "unknown_type", "newer_version", "foreign_trial",
    "lying_frame", "chunk_range", "absurd_size", "replay",
)  # fmt: skip
FUZZER = "fuzzer"  # our src; error replies to it go to an inbox nobody reads
FOREIGN_TRIAL = "fuzz-foreign-trial"
BODIES: dict[MessageType, type] = {
    MessageType.ASSIGN: messages.Assign,
    MessageType.ARTIFACT_REQUEST: messages.ArtifactRequest,
    MessageType.MODEL_REQUEST: messages.ModelRequest,
    MessageType.ABORT: messages.Abort,
    MessageType.SHUTDOWN: messages.Shutdown,
    MessageType.STATUS: messages.Status,
    MessageType.HELLO: messages.Hello,
    MessageType.HOP_STARTED: messages.HopStarted,
    MessageType.HOP_PROGRESS: messages.HopProgress,
    MessageType.HOP_DONE: messages.HopDone,
    MessageType.TRANSFER_ACK: messages.TransferAck,
    MessageType.TRANSFER_NACK: messages.TransferNack,
    MessageType.BYE: messages.Bye,
    MessageType.CHUNK: messages.Chunk,
}
# wrong values for each envelope field (None is wrong only where the field is required)
ENVELOPE_WRONG: dict[str, list[Any]] = {
    "v": ["1", 1.5, True, None, [], {}],
    "type": [1, None, [], {}, "", "has space", "t" * 200],
    "id": [1, None, [], "", "\u00fc" * 3, "i" * 200, "new\nline"],
    "src": [1, None, [], "", "a/b", "#", "+", "x" * 65, "new\nline"],
    "dst": [1, None, [], "", "a/b", "#", "x" * 65],
    "reply_to": [1, [], {}, "", "has space"],
    "trial_id": [1, [], {}, True, ""],
    "created_at": ["now", None, True, [], {}],
    "body": ["x", [], 1, True],
    "error": ["x", [], 1, {"code": 1}, {"code": "c", "message": ["m"]}],
}
NUMBERS = [
    b"1" * 400, b"-" + b"9" * 400, b"7" * 5000, b"1e999", b"-1e400", b"NaN", b"Infinity", b"-Infinity",
    b"1" + b"0" * 30, b"1." + b"5" * 400, b"2e308",
]  # fmt: skip


@dataclass(frozen=True)
class Target:
    """Where a payload goes: an inbox (``owner``: agent id or coordinator) or an agent's status topic."""

    topic: str
    owner: str
    kind: str  # "inbox" | "status"


def targets(agents: Sequence[str]) -> list[Target]:
    out = [Target(topics.coordinator_inbox(), topics.COORDINATOR, "inbox")]
    for agent in agents:
        out += [Target(topics.agent_inbox(agent), agent, "inbox"), Target(topics.agent_status(agent), agent, "status")]
    return out


# -- a valid sample of every body, and wrong values for every field ---------------------------------


def sample(hint: Any) -> Any:
    """A valid JSON value of ``hint`` (dataclasses as dicts)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return sample(next(a for a in typing.get_args(hint) if a is not type(None)))
    if origin is list:
        return [sample(typing.get_args(hint)[0])]
    if origin is dict:
        return {"k": sample(typing.get_args(hint)[1])}
    if dataclasses.is_dataclass(hint):
        kind = typing.cast(type, hint)
        hints = typing.get_type_hints(kind)
        return {f.name: sample(hints[f.name]) for f in dataclasses.fields(kind)}
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return next(iter(hint)).value
    return {str: "x", int: 1, float: 1.5, bool: False}.get(hint, {})


def wrong_values(hint: Any) -> list[Any]:
    """JSON values that are not ``hint`` (for ``Any``: none)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        inner = next(a for a in typing.get_args(hint) if a is not type(None))
        return [v for v in wrong_values(inner) if v is not None]
    if origin is list:
        return ["x", {}, 1, None, *([w] for w in wrong_values(typing.get_args(hint)[0])[:3])]
    if origin is dict:
        item = typing.get_args(hint)[1]
        return ["x", [], 1, None, *({"k": w} for w in wrong_values(item)[:3])]
    if dataclasses.is_dataclass(hint):
        return ["x", [], 1, None, True]
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return ["nonsense", 1, None, [], {}]
    scalars: dict[Any, list[Any]] = {
        str: [1, 2.5, True, None, [], {}],
        int: ["1", 1.5, True, False, None, [], {}],
        float: ["1.0", True, None, [], {}],
        bool: [1, 0, "true", None, [], 1.0],
    }
    return scalars.get(hint, [])


def field_paths(kind: type, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any, str, str]]:
    """(path into the sample body, hint, class name, field name) of every field, nested ones too."""
    hints = typing.get_type_hints(kind)
    for f in dataclasses.fields(kind):
        hint, path = hints[f.name], (*prefix, f.name)
        yield path, hint, kind.__name__, f.name
        inner = hint
        if typing.get_origin(hint) is list:
            inner, path = typing.get_args(hint)[0], (*path, 0)
        if dataclasses.is_dataclass(inner):
            yield from field_paths(typing.cast(type, inner), path)


def set_path(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def mutations() -> list[tuple[MessageType, tuple[Any, ...], Any]]:
    """Every (type, body path, wrong value): every field of every message type, wrong."""
    out = []
    for kind, body in BODIES.items():
        for path, hint, owner, name in field_paths(body):
            wrong = wrong_values(hint)
            if name in messages.NON_NEGATIVE.get(owner, ()):
                wrong = [*wrong, -1]
            out += [(kind, path, value) for value in wrong]
    return out


# -- the generator ------------------------------------------------------------------------------


@dataclass
class Fuzzer:
    """Seeded payload generator. ``observe`` real messages to make replays of them."""

    seed: int
    observed: list[tuple[str, bytes]] = field(default_factory=list)
    max_observed: int = 1000
    max_observed_bytes: int = 128 * 1024  # larger payloads (big chunks) are not kept

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.mutations = mutations()
        self.families: dict[str, Callable[[Target], tuple[str, bytes]]] = {
            name: getattr(self, f"_{name}") for name in FAMILIES
        }

    def observe(self, topic: str, payload: bytes) -> None:
        """Keep a real message for replays: one that decodes, is no error report and not ours."""
        if len(payload) > self.max_observed_bytes:
            return
        try:
            env = decode(payload)
        except ProtocolError:
            return
        if FUZZER in (env.src, env.dst) or env.type == MessageType.ERROR or env.error is not None:
            return
        if len(self.observed) < self.max_observed:
            self.observed.append((topic, payload))
        else:  # reservoir: old and new messages alike
            self.observed[self.rng.randrange(len(self.observed))] = (topic, payload)

    def payload(self, target: Target, addresses: Sequence[str] = ()) -> tuple[str, str, bytes]:
        """(family, topic, payload) for ``target``; the topic differs from the target's only for replays."""
        self.addresses = list(addresses) or [target.owner]
        family = self.rng.choice(FAMILIES)
        if family in ("replay", "foreign_trial") and not self.observed:
            family = "wrong_type"
        topic, data = self.families[family](target)
        return family, topic, data

    # helpers
    def _src(self) -> str:
        return FUZZER if self.rng.random() < 0.6 else self.rng.choice(self.addresses)

    def _dst(self, target: Target) -> str:
        if target.kind == "status":
            return "*"
        return target.owner if self.rng.random() < 0.9 else self.rng.choice([*self.addresses, "nobody"])

    def _header(self, target: Target, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        trial = self.rng.choice([None, FOREIGN_TRIAL])
        return Envelope(kind, self._src(), self._dst(target), body, trial_id=trial, created_at=time.time()).header()

    def _frame(self, header: dict[str, Any], data: bytes) -> bytes:
        head = canonical_json(header)
        return FRAME_MAGIC + struct.pack(">I", len(head)) + head + data

    def _json(self, obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    # families
    def _random_bytes(self, target: Target) -> tuple[str, bytes]:
        data = self.rng.randbytes(self.rng.choice([0, 1, 7, 64, 512, 4096]))
        return target.topic, self.rng.choice([b"", b"{", b"[", b"SNK1", b'{"v":1,']) + data

    def _deep_nesting(self, target: Target) -> tuple[str, bytes]:
        depth = 200_000 if self.rng.random() < 0.02 else self.rng.choice([33, 100, 1000, 5000, 20_000])
        opener = self.rng.choice([b"[", b'{"a":', b'{"body":[', b'{"v":1,"body":'])
        tail = b"]" * depth if opener == b"[" and self.rng.random() < 0.5 else b""
        return target.topic, opener * depth + tail

    def _numbers(self, target: Target) -> tuple[str, bytes]:
        kind, path, _ = self.rng.choice(self.mutations)
        body = sample(BODIES[kind])
        header = self._header(target, kind, body)
        where = self.rng.random()
        if where < 0.3:
            header["created_at"] = "@NUM@"
        elif where < 0.4:
            header["v"] = "@NUM@"
        else:
            set_path(header["body"], path, "@NUM@")
        text = json.dumps(header, separators=(",", ":")).encode().replace(b'"@NUM@"', self.rng.choice(NUMBERS))
        return target.topic, self._frame_or_json(kind, text)

    def _frame_or_json(self, kind: str, text: bytes) -> bytes:
        if kind == MessageType.CHUNK:
            return FRAME_MAGIC + struct.pack(">I", len(text)) + text + b"data"
        return text

    def _wrong_type(self, target: Target) -> tuple[str, bytes]:
        if target.kind == "status" and self.rng.random() < 0.5:
            kind, path, value = MessageType.STATUS, ("state",), self.rng.choice(wrong_values(str))
        else:
            kind, path, value = self.rng.choice(self.mutations)
        header = self._header(target, kind, sample(BODIES[kind]))
        if self.rng.random() < 0.25:  # an envelope field instead of a body field
            name = self.rng.choice(sorted(ENVELOPE_WRONG))
            header[name] = self.rng.choice(ENVELOPE_WRONG[name])
        else:
            set_path(header["body"], path, value)
        return target.topic, self._frame_or_json(kind, canonical_json_lenient(header))

    def _unknown_type(self, target: Target) -> tuple[str, bytes]:
        kind = self.rng.choice(["fuzz", "Hello", "HELLO", "assign2", "chunks", f"t{self.rng.randrange(999)}"])
        return target.topic, canonical_json(self._header(target, kind, {"x": self.rng.randrange(1 << 30)}))

    def _newer_version(self, target: Target) -> tuple[str, bytes]:
        kind = self.rng.choice(list(BODIES))
        header = self._header(target, kind, sample(BODIES[kind]))
        header["v"] = self.rng.choice([2, 3, 0, -1, 1 << 62])
        return target.topic, self._frame_or_json(kind, canonical_json(header))

    def _foreign_trial(self, target: Target) -> tuple[str, bytes]:
        topic, payload = self.rng.choice(self.observed)
        env = decode(payload)
        if env.type in (MessageType.ASSIGN, MessageType.HELLO, MessageType.STATUS):  # these may start/join a trial
            return self._wrong_type(target)
        header = env.header() | {"id": new_id(), "trial_id": FOREIGN_TRIAL}
        if env.data is not None:  # a chunk under another trial: its digest no longer matches (nothing completes)
            header["body"] = header["body"] | {"chunk_sha256": "0" * 64}
            return topic, self._frame(header, env.data)
        return topic, canonical_json(header)

    def _lying_frame(self, target: Target) -> tuple[str, bytes]:
        head = canonical_json(self._header(target, MessageType.CHUNK, sample(messages.Chunk)))
        lie = self.rng.choice([len(head) + 1, len(head) + 1000, len(head) - 1, 0, 1, 0xFFFFFFFF, 64 * 1024 + 1])
        tail = self.rng.choice([b"", b"data", self.rng.randbytes(32)])
        short = self.rng.choice([b"SNK1", b"SNK1\x00", b"SNK1\x00\x00\x00"])
        return target.topic, short if self.rng.random() < 0.1 else FRAME_MAGIC + struct.pack(">I", lie) + head + tail

    def _chunk(self, target: Target, **body: Any) -> bytes:
        data = self.rng.randbytes(self.rng.choice([0, 1, 16, 100]))
        chunk = sample(messages.Chunk) | {"transfer_id": new_id(), "purpose": self.rng.choice(list(Purpose)).value,
                                          "sha256": "0" * 64, "chunk_sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
        return self._frame(self._header(target, MessageType.CHUNK, chunk | body), data)

    def _chunk_range(self, target: Target) -> tuple[str, bytes]:
        seq, count = self.rng.choice([(5, 5), (9, 2), (0, 0), (-1, 3), (0, -1), (1 << 40, 2), (0, 1 << 62), (2, 1)])
        if self.rng.random() < 0.2:  # in range, but the data does not match its digest
            return target.topic, self._chunk(target, seq=0, count=2, size=200, chunk_sha256="f" * 64)
        return target.topic, self._chunk(target, seq=seq, count=count, size=self.rng.choice([10, 1000]))

    def _absurd_size(self, target: Target) -> tuple[str, bytes]:
        if self.rng.random() < 0.001:
            return target.topic, b'{"v":1,"pad":"' + b"x" * MAX_CONTROL_BYTES + b'"}'
        size = self.rng.choice([-1, -(1 << 62), 1 << 40, (1 << 63) - 1, 3 << 30])
        return target.topic, self._chunk(target, seq=0, count=1, size=size)

    def _replay(self, target: Target) -> tuple[str, bytes]:
        topic, payload = self.rng.choice(self.observed)
        if self.rng.random() < 0.2 and target.kind == "inbox":
            return target.topic, payload  # into another inbox: misrouted
        return topic, payload


def canonical_json_lenient(obj: dict[str, Any]) -> bytes:
    """Like the wire form, but any value at all (wrong types are the point)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# -- the client ---------------------------------------------------------------------------------


@dataclass
class Report:
    seed: int
    rate: float
    sent: int = 0
    duration_s: float = 0.0
    observed: int = 0
    families: Counter[str] = field(default_factory=Counter)
    topics: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "count": self.sent, "rate": self.rate, "duration_s": round(self.duration_s, 3),
            "observed": self.observed, "families": dict(sorted(self.families.items())),
            "topics": dict(sorted(self.topics.items())),
        }  # fmt: skip


class FuzzClient:
    """The foreign client: captures ``snake/#``, publishes ``count`` payloads at ``rate`` per second.

    ``start`` runs it in a thread; ``stop`` ends it early; ``join`` waits. Agents are the ``agents``
    given plus any seen on the broker."""

    def __init__(self, broker: str, seed: int, count: int, rate: float = 200.0, agents: Sequence[str] = ()) -> None:
        from edge_agent.mqtt import MqttLink, parse_broker_url  # paho only where a broker is used

        self.link = MqttLink(parse_broker_url(broker), f"snake-fuzzer-{seed}", [f"{topics.ROOT}/#"], clean_session=True)
        self.fuzzer = Fuzzer(seed)
        self.count, self.rate = count, rate
        self.agents: set[str] = set(agents)
        self.report = Report(seed, rate)
        self.mine: set[bytes] = set()  # digests of what we sent: never observed as real traffic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="fuzzer", daemon=True)

    def start(self) -> None:
        self.link.start(timeout=10.0)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> Report:
        self._thread.join(timeout)
        return self.report

    def close(self) -> None:
        self.stop()
        self._thread.join(10.0)
        self.link.stop()

    def run(self) -> None:
        started = time.monotonic()
        while self.report.sent < self.count and not self._stop.is_set():
            self._capture()
            family, topic, payload = self.fuzzer.payload(
                self.fuzzer.rng.choice(targets(sorted(self.agents))), [topics.COORDINATOR, *sorted(self.agents)]
            )
            self.mine.add(hashlib.sha1(payload).digest())
            self.link.publish(topic, payload)  # QoS 1, never retained
            self.report.sent += 1
            self.report.families[family] += 1
            self.report.topics[topic] += 1
            if self.report.sent % 500 == 0:
                self.link.wait_published(timeout=10.0)  # do not run ahead of the broker
            self.report.duration_s = time.monotonic() - started
            delay = started + self.report.sent / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.report.duration_s = time.monotonic() - started

    def _capture(self) -> None:
        while (msg := self.link.get(timeout=0)) is not None:
            parsed = topics.parse(msg.topic)
            if parsed is not None and parsed.kind in ("status", "inbox") and parsed.owner != FUZZER:
                self.agents.add(parsed.owner)
            if hashlib.sha1(msg.payload).digest() not in self.mine and parsed is not None:
                self.fuzzer.observe(msg.topic, msg.payload)
                self.report.observed += 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", required=True, help="broker URL, e.g. mqtt://127.0.0.1:1883")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed, same payloads)")
    ap.add_argument("--count", type=int, default=10_000, help="payloads to publish")
    ap.add_argument("--rate", type=float, default=200.0, help="payloads per second at most")
    ap.add_argument("--agents", default="", help="comma-separated agent ids to target (others are found on the broker)")
    ap.add_argument("--out", type=Path, help="write the report (JSON) here; stdout otherwise")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = FuzzClient(args.broker, args.seed, args.count, args.rate, [a for a in args.agents.split(",") if a])
    client.start()
    try:
        report = client.join()
    except KeyboardInterrupt:
        report = client.report
    finally:
        client.close()
    text = json.dumps(report.as_dict(), indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
