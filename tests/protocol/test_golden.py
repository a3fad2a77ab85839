"""Golden bytes: what the protocol puts on the wire, byte for byte, for fixed inputs.

Each test builds a message from fixed inputs (ids, times, tensors), compares its encoding with a
file under ``tests/protocol/golden/``, and decodes that file back to check the fields. A change
to the protocol therefore shows up as a changed golden file, to be reviewed like code: an
intended change updates the files, an unintended one fails here.

Regenerate the files after an intended change (then read the diff, and bump
``envelope.VERSION`` if old peers cannot read the new bytes):

    SNAKE_UPDATE_GOLDEN=1 python -m pytest tests/protocol/test_golden.py

Random ids (an envelope's ``id``, a transfer's id) are pinned by replacing them in the encoded
bytes with fixed ones of the same length, so the real encoders (``Outbox.send``, ``error_reply``)
are what is compared. The ``.json`` files are the readable halves of the binary ones (the frame's
chunk body, the model payload's safetensors header), so a change reads as a text diff.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_agent.protocol import topics
from edge_agent.protocol.codec import decode_tensors
from edge_agent.protocol.delta import (
    Base,
    ModelHeader,
    advance,
    assemble,
    decode_model,
    digests_of,
    encode_model,
    newer,
)
from edge_agent.protocol.envelope import FRAME_MAGIC, Envelope, canonical_json, decode, encode
from edge_agent.protocol.kinds import MessageType, Purpose
from edge_agent.protocol.messages import Assign, Chunk, Hello, HopDone, HopTask, body_of, to_body
from edge_agent.protocol.transfer import Outbox, error_reply, sha256_hex

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("SNAKE_UPDATE_GOLDEN") == "1"
NOW = 1732500000.25  # created_at of every message (seconds since the epoch)
ID = "0123456789abcdef0123456789abcdef"  # an envelope id, as new_id() makes them (32 hex digits)
TRANSFER_ID = "fedcba9876543210fedcba9876543210"
COORD = topics.COORDINATOR


def check_golden(name: str, data: bytes) -> bytes:
    """``data`` equals the golden file ``name`` (written instead when SNAKE_UPDATE_GOLDEN=1); its bytes."""
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    assert path.is_file(), f"no golden file {path}; run with SNAKE_UPDATE_GOLDEN=1 to write it"
    golden = path.read_bytes()
    if data != golden:
        at = next(
            (i for i, (a, b) in enumerate(zip(data, golden, strict=False)) if a != b), min(len(data), len(golden))
        )
        pytest.fail(
            f"{name}: the encoding changed ({len(data)} bytes, golden {len(golden)}; first difference at byte {at}:"
            f" {data[at : at + 40]!r} vs {golden[at : at + 40]!r}). If the protocol change is intended,"
            " regenerate with SNAKE_UPDATE_GOLDEN=1 and review the diff."
        )
    return golden


def pin(data: bytes, *ids: tuple[str, str]) -> bytes:
    """``data`` with each random id replaced by a fixed one of the same length (each must occur)."""
    for random_id, fixed in ids:
        assert len(random_id) == len(fixed) and random_id.encode() in data
        data = data.replace(random_id.encode(), fixed.encode())
    return data


# -- fixed inputs ---------------------------------------------------------------------------------


def hello() -> Hello:
    return Hello(
        agent_id="agent-0",
        backend="ort",
        versions={"onnxruntime-training": "1.19.2", "numpy": "2.1.3"},  # not sorted: the encoder sorts
        arch="x86_64",
        system="Linux",
        python="3.11.9",
        cores=4,
        memory_mb=7872,
        memory_budget_mb=420,
        num_train=5400,
        num_val=600,
        num_classes=10,
        input_shape=[1, 28, 28],
        label_histogram=[540] * 10,
        gflops=12.5,
        baseline_mb=85.25,
        instance="5e0c7b4a9d2f4c1e",
    )


def assign() -> Assign:
    task = HopTask(
        round=1,
        hop=3,
        segment=1,
        groups=["conv1", "fc"],
        tensors=["conv1.weight", "conv1.bias", "fc.weight", "fc.bias"],
        artifact_sha256="ab" * 32,
        artifact_size=123456,
        prev="agent-0",
        next="agent-1",
        epochs=1,
        batch_size=32,
        lr=0.001,
        seed=7,
        checkpoint=True,
        kd_alpha=0.5,
        next_holds={"fc": 1, "conv0": -1},
    )
    groups = {"conv0": ["conv0.weight", "conv0.bias"], "conv1": ["conv1.weight", "conv1.bias"], "fc": ["fc.weight"]}
    return Assign(tasks=[task], chunk_bytes=1 << 20, compression="fp16", groups=groups)


def hop_done() -> HopDone:
    return HopDone(
        round=1,
        hop=3,
        segment=1,
        train_loss=0.6931471805599453,
        val_loss=None,  # split learning's front alone has none
        val_accuracy=None,
        steps=168,
        samples=5376,
        train_s=12.75,
        trainable_params=23530,
        model_sha256="cd" * 32,
        model_bytes=421000,
        bytes_sent=1 << 20,
        bytes_received=3 << 20,
        peak_rss_mb=190.5,
        backend="portable",
    )


LAYOUT = {"conv": ["conv.weight", "conv.bias"], "fc": ["fc.weight", "fc.bias"]}


def model() -> dict[str, np.ndarray]:
    """A small model: two layer groups and a BatchNorm buffer outside them, exact in fp16."""
    return {
        "conv.weight": np.arange(12, dtype=np.float32).reshape(2, 1, 2, 3) / 4,
        "conv.bias": np.array([0.5, -0.25], np.float32),
        "bn.running_mean": np.array([0.125, -1.0], np.float32),
        "fc.weight": np.arange(6, dtype=np.float32).reshape(3, 2) / -8,
        "fc.bias": np.zeros(3, np.float32),
    }


def delta_payload() -> bytes:
    """Hop 3 trained ``fc``; the receiver holds the model as of hop 0, so ``fc`` and the buffer travel."""
    tensors = model()
    versions = advance(advance({}, ["conv", "fc"], 0, LAYOUT), ["fc"], 3, LAYOUT)
    send = newer(versions, {"conv": 0, "fc": 0})
    return encode_model(tensors, LAYOUT, versions, digests_of(tensors, LAYOUT), send)


# -- the JSON envelope ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("envelope_hello.json", Envelope(MessageType.HELLO, "agent-0", COORD, to_body(hello()), ID, created_at=NOW)),
        ("envelope_assign.json", Envelope(MessageType.ASSIGN, COORD, "agent-1", to_body(assign()), ID, None, "t1", NOW)),
        ("envelope_hop_done.json", Envelope(MessageType.HOP_DONE, "agent-1", COORD, to_body(hop_done()), ID, "9" * 32, "t1", NOW)),
    ],
)  # fmt: skip
def test_envelope_golden(name: str, env: Envelope) -> None:
    golden = check_golden(name, encode(env))
    back = decode(golden)
    assert back == env and back.data is None and back.v == 1


def test_envelope_bodies_decode_to_their_dataclasses() -> None:
    assert body_of(Hello, decode((GOLDEN / "envelope_hello.json").read_bytes()).body) == hello()
    back = decode((GOLDEN / "envelope_assign.json").read_bytes())
    assert back.type == MessageType.ASSIGN and back.trial_id == "t1" and back.created_at == NOW
    assert body_of(Assign, back.body) == assign()
    assert body_of(HopDone, decode((GOLDEN / "envelope_hop_done.json").read_bytes()).body) == hop_done()


def test_error_reply_golden() -> None:
    request = Envelope(MessageType.ASSIGN, COORD, "agent-1", to_body(assign()), "9" * 32, None, "t1", NOW)
    out = error_reply(request, "agent-1", "unknown_type", "agents do not handle 'assign' messages", NOW + 1)
    sent = decode(out.payload)
    golden = check_golden("envelope_error.json", pin(out.payload, (sent.id, ID)))
    back = decode(golden)
    assert out.topic == topics.coordinator_inbox() and not out.retain
    assert back.type == MessageType.ERROR and back.body == {} and back.reply_to == request.id
    assert back.error == {"code": "unknown_type", "message": "agents do not handle 'assign' messages"}
    assert (back.src, back.dst, back.trial_id, back.created_at) == ("agent-1", COORD, "t1", NOW + 1)


def test_envelope_encoding_ignores_dict_order() -> None:
    env = Envelope(MessageType.HELLO, "agent-0", COORD, to_body(hello()), ID, created_at=NOW)
    body = dict(reversed(list(env.body.items())))
    body["versions"] = dict(reversed(list(body["versions"].items())))
    assert encode(Envelope(MessageType.HELLO, "agent-0", COORD, body, ID, created_at=NOW)) == encode(env)


# -- the SNK1 frame and its chunk body ------------------------------------------------------------


def model_frames() -> tuple[list[bytes], str, list[str]]:
    """The frames of the golden delta sent in chunks of 256 bytes by the real Outbox (ids pinned)."""
    data = delta_payload()
    pending, out = Outbox("agent-1").send("agent-2", "t1", Purpose.MODEL, {"hop": 3, "round": 1}, data, 256, NOW)
    assert all(o.topic == topics.agent_inbox("agent-2") for o in out)
    ids = [decode(o.payload).id for o in out]
    frames = [pin(o.payload, (pending.transfer_id, TRANSFER_ID), (i, ID)) for o, i in zip(out, ids, strict=True)]
    return frames, sha256_hex(data), [sha256_hex(data[s * 256 : (s + 1) * 256]) for s in range(len(frames))]


def test_chunk_frame_golden() -> None:
    frames, digest, chunk_digests = model_frames()
    assert len(frames) == 3  # 256 + 256 + the rest
    golden = check_golden("chunk_frame.bin", frames[1])
    assert golden[:4] == FRAME_MAGIC
    (size,) = struct.unpack(">I", golden[4:8])
    header = json.loads(golden[8 : 8 + size])
    assert header["type"] == "chunk" and header["id"] == ID and header["created_at"] == NOW
    env = decode(golden)
    assert (env.type, env.src, env.dst, env.trial_id) == (MessageType.CHUNK, "agent-1", "agent-2", "t1")
    assert env.data == delta_payload()[256:512] == golden[8 + size :]
    chunk = body_of(Chunk, env.body)
    assert chunk == Chunk(
        TRANSFER_ID, Purpose.MODEL, 1, 3, len(delta_payload()), digest, chunk_digests[1], {"hop": 3, "round": 1}
    )


def test_chunk_body_golden() -> None:
    frames, _, _ = model_frames()
    body = decode(frames[1]).body
    golden = check_golden("chunk_body.json", canonical_json(body) + b"\n")
    chunk = body_of(Chunk, json.loads(golden))
    assert chunk.purpose is Purpose.MODEL and (chunk.seq, chunk.count) == (1, 3) and chunk.transfer_id == TRANSFER_ID


# -- the model payload and its header -------------------------------------------------------------


def test_model_delta_golden() -> None:
    golden = check_golden("model_delta.safetensors", delta_payload())
    (size,) = struct.unpack("<Q", golden[:8])
    check_golden("model_delta.header.json", golden[8 : 8 + size].rstrip(b" ") + b"\n")
    tensors, header = decode_model(golden)
    assert header is not None and not header.full
    assert header == ModelHeader({"conv": 0, "fc": 3}, digests_of(model(), LAYOUT), ("fc",))
    assert list(tensors) == ["bn.running_mean", "fc.weight", "fc.bias"]  # the sent group and every buffer
    base = Base({"conv": 0, "fc": 0}, model())
    whole = assemble(tensors, header, LAYOUT, base)
    assert set(whole) == set(model()) and all(np.array_equal(whole[n], t) for n, t in model().items())


def test_model_header_ignores_dict_order() -> None:
    tensors = model()
    versions, digests = {"fc": 3, "conv": 0}, digests_of(tensors, LAYOUT)
    swapped = encode_model(tensors, LAYOUT, versions, dict(reversed(list(digests.items()))), ["fc"])
    assert swapped == delta_payload()


def test_full_model_fp16_golden() -> None:
    tensors = model()
    versions = advance({}, [], 0, LAYOUT)
    data = encode_model(tensors, LAYOUT, versions, digests_of(tensors, LAYOUT), list(LAYOUT), "fp16")
    golden = check_golden("model_full_fp16.safetensors", data)
    back, header = decode_model(golden)
    assert header is not None and header.full and header.versions == {"conv": -1, "fc": -1}
    assert list(back) == list(tensors) and all(np.array_equal(back[n], t) for n, t in tensors.items())
    assert decode_tensors(golden).keys() == tensors.keys()


def test_no_stale_golden_files() -> None:
    expected = {
        "envelope_hello.json",
        "envelope_assign.json",
        "envelope_hop_done.json",
        "envelope_error.json",
        "chunk_frame.bin",
        "chunk_body.json",
        "model_delta.safetensors",
        "model_delta.header.json",
        "model_full_fp16.safetensors",
    }
    assert {p.name for p in GOLDEN.iterdir()} == expected
