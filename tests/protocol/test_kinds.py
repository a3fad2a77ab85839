"""Message types and transfer purposes are typed names: they encode as the plain strings and a
receiver refuses a purpose the protocol does not know, with a reason."""

from __future__ import annotations

import json

import pytest

from edge_agent.protocol.envelope import Envelope, decode, encode
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.kinds import MessageType, Purpose
from edge_agent.protocol.messages import Chunk, body_of, to_body
from edge_agent.protocol.split import ACTIVATIONS, GRADIENTS
from edge_agent.protocol.transfer import Outbox, Reassembler


def test_names_travel_as_plain_strings() -> None:
    env = Envelope(MessageType.TRANSFER_ACK, "a0", "coordinator", {"purpose": Purpose.CHECKPOINT})
    wire = json.loads(encode(env))
    assert wire["type"] == "transfer_ack" and wire["body"] == {"purpose": "checkpoint"}
    assert decode(encode(env)).type == MessageType.TRANSFER_ACK
    assert (ACTIVATIONS, GRADIENTS) == ("activations", "gradients")  # the old names are the enum members


def test_chunk_purpose_is_checked_on_receipt() -> None:
    _, out = Outbox("a0").send("a1", "t1", Purpose.ARTIFACT, {}, b"bundle", 4, 0.0)
    chunk = body_of(Chunk, decode(out[0].payload).body)
    assert chunk.purpose is Purpose.ARTIFACT
    body = to_body(chunk) | {"purpose": "weights"}
    with pytest.raises(ProtocolError, match="purpose is 'weights', not one of model, artifact") as err:
        body_of(Chunk, body)
    assert err.value.code == "malformed"
    with pytest.raises(ProtocolError, match="purpose is 3"):
        body_of(Chunk, body | {"purpose": 3})
    foreign = Envelope(MessageType.CHUNK, "a0", "a1", body, trial_id="t1", data=b"bund")
    with pytest.raises(ProtocolError, match="weights"):
        Reassembler("a1").add(foreign, 0.0)


def test_a_sender_cannot_invent_a_purpose() -> None:
    with pytest.raises(ValueError, match="weights"):
        Outbox("a0").send("a1", "t1", "weights", {}, b"data", 4, 0.0)
