"""No payload raises out of ``Agent.handle`` or ``Controller.handle``: each is refused with a reason, counted,
answered where the envelope names a sender, and dropped (tools/fuzz.py makes the payloads)."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.controller import Controller
from edge_agent.agent import Agent
from edge_agent.protocol import messages, topics
from edge_agent.protocol.envelope import FRAME_MAGIC, Envelope, canonical_json, decode
from edge_agent.protocol.errors import ProtocolError, Rejections
from edge_agent.protocol.guard import Guard
from edge_agent.protocol.kinds import MessageType
from edge_agent.protocol.transfer import Outgoing
from tests.protocol.trial_bed import TrialBed, hello
from tools.fuzz import BODIES, FAMILIES, Fuzzer, mutations, sample, set_path, targets

AGENT, PEER = "a0", "a1"
COORD = topics.COORDINATOR


class Receiver:
    """An Agent or a Controller behind one interface: handle, outgoing messages, rejections."""

    def __init__(self, tmp: Path, kind: str) -> None:
        self.kind = kind
        self.me = AGENT if kind == "agent" else COORD
        self.inbox = topics.inbox(self.me)
        self.agent = Agent(hello(AGENT), set()) if kind == "agent" else None
        self.ctl: Controller | None = TrialBed(tmp).ctl if kind == "controller" else None

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        if self.agent is not None:
            return self.agent.handle(topic, payload, 100.0).out
        assert self.ctl is not None
        return self.ctl.handle(topic, payload, 100.0).out

    @property
    def rejections(self) -> Rejections:
        return self.agent.rejections if self.agent is not None else self.ctl.rejections  # type: ignore[union-attr]


@pytest.fixture(params=["agent", "controller"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Receiver:
    return Receiver(tmp_path, request.param)


def envelope_json(dst: str, kind: str = "hello", src: str = PEER, **fields: Any) -> dict[str, Any]:
    header = Envelope(kind, src, dst, {}, created_at=1.0).header()
    return header | fields


def with_number(header: dict[str, Any], literal: bytes) -> bytes:
    header = header | {"created_at": "@N@"}
    return json.dumps(header).encode().replace(b'"@N@"', literal)


def frame(header: bytes, claimed: int, data: bytes = b"") -> bytes:
    return FRAME_MAGIC + struct.pack(">I", claimed) + header + data


def refused_once(receiver: Receiver, payload: bytes, code: str, topic: str | None = None) -> list[Outgoing]:
    before = dict(receiver.rejections.counts)
    out = receiver.handle(topic or receiver.inbox, payload)
    after = dict(receiver.rejections.counts)
    assert after.get(code, 0) == before.get(code, 0) + 1, (code, before, after)
    assert receiver.rejections.total == sum(before.values()) + 1
    return out


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"[" * 200_000, "too_deep"),  # the user's 200 KB: RecursionError in json.loads before
        (b'{"a":' * 50_000, "too_deep"),
        (b"[" * 33 + b"]" * 33, "too_deep"),
        (with_number(envelope_json(AGENT), b"9" * 400), "bad_number"),  # OverflowError in float(int) before
        (with_number(envelope_json(AGENT), b"7" * 5000), "bad_number"),  # ValueError (int digits limit) before
        (with_number(envelope_json(AGENT), b"1e999"), "bad_number"),
        (with_number(envelope_json(AGENT), b"NaN"), "bad_number"),
        (with_number(envelope_json(AGENT), b"-Infinity"), "bad_number"),
        (frame(b'{"v":1}', 1 << 31), "malformed"),  # a header length beyond the frame
        (frame(b'{"v":1}', 3, b"tail"), "malformed"),  # a header length that cuts the JSON
        (frame(b"", 0), "malformed"),
        (b"SNK1\x00\x00", "malformed"),
        (b"\xff\xfe\x00", "malformed"),
        (b"", "malformed"),
        (json.dumps(envelope_json(AGENT, src="a\n2026 ERROR forged")).encode(), "malformed"),  # log injection
        (json.dumps(envelope_json(AGENT, id="\udcff")).encode(), "malformed"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_payloads_that_used_to_kill_a_process_are_refused(receiver: Receiver, payload: bytes, code: str) -> None:
    out = refused_once(receiver, payload, code)
    assert out == []  # nothing decodable names a sender: nobody to answer


def test_a_deep_body_inside_a_valid_envelope_is_refused_and_answered(receiver: Receiver) -> None:
    """Nesting is refused before parsing, so there is no src to answer; a 400-digit body field likewise."""
    header = envelope_json(receiver.me, "hop_done")
    text = canonical_json(header).replace(b'"body":{}', b'"body":{"x":' + b"[" * 40 + b"]" * 40 + b"}")
    assert refused_once(receiver, text, "too_deep") == []


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_every_field_of_every_message_type_with_a_wrong_type_is_refused_and_answered(
    receiver: Receiver, kind: MessageType
) -> None:
    cases = [(path, value) for k, path, value in mutations() if k == kind]
    assert cases
    for path, value in cases:
        header = envelope_json(receiver.me, kind) | {"body": sample(BODIES[kind])}
        set_path(header["body"], path, value)
        text = json.dumps(header, sort_keys=True).encode()
        payload = frame(text, len(text), b"data") if kind == MessageType.CHUNK else text
        before = receiver.rejections.total
        out = receiver.handle(receiver.inbox, payload)
        assert receiver.rejections.total == before + 1, (path, value)
        assert internal(receiver) == 0
        assert len(out) == 1 and out[0].topic == topics.inbox(PEER), (path, value)  # an error reply to the sender
        reply = decode(out[0].payload)
        assert reply.type == MessageType.ERROR and reply.error is not None and reply.reply_to == header["id"]
        assert len(reply.error["message"]) <= 300


def test_an_error_is_never_answered_with_an_error(receiver: Receiver) -> None:
    error = envelope_json(receiver.me, "error", trial_id="another-trial") | {"error": {"code": "x", "message": "y"}}
    del error["body"]
    before = receiver.rejections.total
    out = receiver.handle(receiver.inbox, canonical_json(error))
    assert not [o for o in out if decode(o.payload).type == MessageType.ERROR]
    assert receiver.rejections.total <= before + 1


@pytest.mark.expect_errors
def test_a_bug_in_a_handler_is_counted_as_internal_and_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = Guard("a0")
    payload = canonical_json(envelope_json("a0"))

    def broken(env: Envelope) -> list[Outgoing]:
        raise KeyError("a bug")

    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            out = guard.receive("t", payload, 1.0, broken, list)
            assert len(out) == 1 and decode(out[0].payload).error == {"code": "internal", "message": "KeyError in a0"}
    assert guard.rejections.as_dict() == {"internal": 3}
    assert [r.exc_info is not None for r in caplog.records] == [True, False, False]


def internal(receiver: Receiver) -> int:
    return receiver.rejections.counts.get("internal", 0)


def test_two_thousand_fuzz_payloads_offline(receiver: Receiver) -> None:
    fuzzer = Fuzzer(seed=7)
    bed_messages = real_messages()
    for topic, payload in bed_messages:
        fuzzer.observe(topic, payload)
    assert len(fuzzer.observed) > 20
    aim = [t for t in targets([AGENT, PEER]) if t.owner == receiver.me or (t.kind == "status" and receiver.ctl)]
    families: dict[str, int] = {}
    for i in range(2000):
        family, topic, payload = fuzzer.payload(aim[i % len(aim)], [COORD, AGENT, PEER])
        families[family] = families.get(family, 0) + 1
        receiver.handle(topic, payload)
    assert set(families) == set(FAMILIES)
    counts = receiver.rejections.as_dict()
    assert "internal" not in counts
    assert {"too_deep", "bad_number", "malformed", "version", "unknown_type"} <= set(counts)
    assert receiver.rejections.total > 1500  # replays are duplicates (dropped quietly), the rest refused


_REAL: list[tuple[str, bytes]] = []


def real_messages() -> list[tuple[str, bytes]]:
    """Everything published during one in-memory trial (hellos, assigns, chunks, acks, hop reports, byes)."""
    if not _REAL:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            bed = TrialBed(Path(tmp), agents=2, rounds=1, chunk_bytes=2048)
            bed.run()
            bed.finish()
            _REAL.extend(bed.broker.published)
    return _REAL


def test_a_whole_in_memory_trial_under_fuzz_ends_with_the_same_model(tmp_path: Path) -> None:
    """The real services over the in-memory broker, fuzzed between turns: same final model, rejections counted."""
    clean = TrialBed(tmp_path / "clean", agents=3, rounds=2, chunk_bytes=4096)
    clean.run()
    fuzzed = TrialBed(tmp_path / "fuzzed", agents=3, rounds=2, chunk_bytes=4096)
    fuzzer, seen, sent = Fuzzer(seed=11), [0], [0]
    aim = targets(sorted(fuzzed.services))
    addresses = [COORD, *sorted(fuzzed.services)]
    mine: set[bytes] = set()

    def fuzz_then_check() -> bool:
        for topic, payload in fuzzed.broker.published[seen[0] :]:
            if payload not in mine:
                fuzzer.observe(topic, payload)
        for _ in range(10):
            _, topic, payload = fuzzer.payload(aim[sent[0] % len(aim)], addresses)
            mine.add(payload)
            fuzzed.broker.publish(topic, payload)
            sent[0] += 1
        seen[0] = len(fuzzed.broker.published)
        return fuzzed.ctl.finished and not fuzzed.coordinator.busy

    fuzzed.run(until=fuzz_then_check)
    assert fuzzed.ctl.failed is None and sent[0] > 300
    assert clean.final.keys() == fuzzed.final.keys()
    assert all(np.array_equal(clean.final[k], fuzzed.final[k]) for k in clean.final)
    fuzzed.finish()
    assert fuzzed.ctl.rejections.total > 100 and "internal" not in fuzzed.ctl.rejections.counts
    for name, service in fuzzed.services.items():
        assert service.agent.rejections.total > 50 and "internal" not in service.agent.rejections.counts
        assert fuzzed.ctl.byes[name].rejected == service.agent.rejections.as_dict()  # the bye carries them


@pytest.mark.parametrize(
    ("kind", "body", "code"),
    [
        (messages.Chunk, {**sample(messages.Chunk), "size": 10**400}, "bad_number"),  # a body built in Python
        (messages.HopProgress, {**sample(messages.HopProgress), "loss": float("inf")}, "bad_number"),
        (messages.Chunk, {**sample(messages.Chunk), "seq": True}, "malformed"),  # a bool is no int
        (messages.Chunk, {**sample(messages.Chunk), "size": -1}, "malformed"),
        (messages.TransferNack, {"transfer_id": "t", "missing": [[1]], "reason": "r"}, "malformed"),
        (messages.TransferNack, {"transfer_id": "t", "missing": [-1], "reason": "r"}, "malformed"),
        (messages.Bye, {**sample(messages.Bye), "rejected": {"x": -1}}, "malformed"),
    ],
)
def test_body_of_refuses_what_the_decoder_never_lets_through(kind: type, body: dict[str, Any], code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        messages.body_of(kind, body)
    assert caught.value.code == code and len(caught.value.message) < 200


def test_an_old_bye_without_rejections_still_reads() -> None:
    old = {"bytes_sent": 1, "bytes_received": 2, "peak_rss_mb": 3.0, "hops": 4}
    assert messages.body_of(messages.Bye, old).rejected == {}
