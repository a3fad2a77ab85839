"""Version bookkeeping of layer groups: what travels, and how a receiver completes and checks it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.plan import GroupInfo, Plan, PlannedHop, _segment
from coordinator.scheduler import snake_plan
from edge_agent.model_cache import ModelCache
from edge_agent.protocol.codec import decode_tensors, decode_views, encode_tensors
from edge_agent.protocol.delta import (
    INITIAL,
    Base,
    BaseMismatch,
    ModelHeader,
    advance,
    assemble,
    decode_model,
    digests_of,
    encode_model,
    model_digest,
    newer,
)
from edge_agent.protocol.errors import ProtocolError

LAYOUT = {"a": ["a.w", "a.b"], "b": ["b.w"], "c": ["c.w"]}


def model(offset: float = 0.0) -> dict[str, np.ndarray]:
    out = {name: np.full((2, 3), i + offset, np.float32) for i, name in enumerate(["a.w", "a.b", "b.w", "c.w"])}
    out["a.running_mean"] = np.full(3, 7 + offset, np.float32)  # a buffer: outside the layout, always travels
    return out


def test_versions_advance_and_only_newer_groups_are_sent() -> None:
    v0 = advance({}, [], 0, LAYOUT)
    assert v0 == {"a": INITIAL, "b": INITIAL, "c": INITIAL}
    v3 = advance(advance(v0, ["a"], 2, LAYOUT), ["c"], 3, LAYOUT)
    assert v3 == {"a": 2, "b": INITIAL, "c": 3}
    assert newer(v3, {}) == ["a", "b", "c"]  # holds nothing: everything
    assert newer(v3, {"a": 2, "b": INITIAL, "c": 1}) == ["c"]


def test_the_plan_knows_what_each_receiver_holds() -> None:
    """Versions follow the hop that last trained a group, whatever segment it was in (segments change per round)."""
    groups = [GroupInfo(g, (f"{g}.w",), (), 10) for g in "abcd"]
    segments = tuple(_segment(i, groups[lo:hi]) for i, (lo, hi) in enumerate([(0, 2), (2, 4), (0, 1), (1, 4)]))
    hops = (PlannedHop(0, 0, "x", 0), PlannedHop(0, 1, "y", 1), PlannedHop(1, 2, "y", 2), PlannedHop(1, 3, "x", 3))
    plan = Plan("p2p", segments, hops, layout=tuple((g.name, g.params) for g in groups))
    assert plan.versions_after(-1) == dict.fromkeys("abcd", INITIAL)
    assert plan.versions_after(1) == {"a": 0, "b": 0, "c": 1, "d": 1}
    assert plan.versions_after(3) == {"a": 2, "b": 3, "c": 3, "d": 3}
    assert plan.held_by(0) == {} and plan.held_by(1) == {}  # first visits hold nothing
    assert plan.held_by(2) == plan.versions_after(1)  # y holds its own hop-1 output
    assert newer(plan.versions_after(1), plan.held_by(2)) == []  # y trains right after itself: nothing new
    assert plan.held_by(3) == plan.versions_after(0)  # x holds its hop-0 output
    assert newer(plan.versions_after(2), plan.held_by(3)) == ["a", "c", "d"]  # what y trained since


def test_a_real_plan_sends_receivers_only_newer_groups() -> None:
    groups = [GroupInfo(g, (f"{g}.w",), (), 10) for g in "abcd"]
    plan = snake_plan(["x", "y", "z"], groups, rounds=3)
    for h in plan.hops[1:]:
        held, current = plan.held_by(h.hop), plan.versions_after(h.hop - 1)
        assert all(current[g] >= v for g, v in held.items())  # a receiver never holds something newer
        if held:  # what it lacks is exactly what others trained since its last hop
            mine = max(p.hop for p in plan.hops[: h.hop] if p.agent == h.agent)
            since = {g for p in plan.hops[mine + 1 : h.hop] for g in plan.segments[p.segment].groups}
            assert set(newer(current, held)) == since


def test_a_delta_is_completed_from_the_cached_copy_and_checked() -> None:
    old, new = model(), model(0.5)
    versions_old = {"a": 0, "b": 0, "c": 0}
    versions_new = {"a": 0, "b": 1, "c": 2}
    new.update({n: old[n] for n in LAYOUT["a"]})  # group a did not change
    data = encode_model(new, LAYOUT, versions_new, digests_of(new, LAYOUT), ["b", "c"])
    payload, header = decode_model(data)
    assert header is not None and header.sent == ("b", "c") and not header.full
    assert set(payload) == {"b.w", "c.w", "a.running_mean"}
    whole = assemble(payload, header, LAYOUT, Base(versions_old, old))
    assert all(np.array_equal(whole[n], new[n]) for n in new)
    with pytest.raises(BaseMismatch, match="no cached copy"):
        assemble(payload, header, LAYOUT, None)
    with pytest.raises(BaseMismatch, match="version"):
        assemble(payload, header, LAYOUT, Base({"a": 5, "b": 0, "c": 0}, old))
    tampered = {**old, "a.w": old["a.w"] + 1}
    with pytest.raises(BaseMismatch, match="digest"):
        assemble(payload, header, LAYOUT, Base(versions_old, tampered))


def test_malformed_model_headers_are_refused() -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        ModelHeader.from_metadata({"snake.model": "{not json"})
    with pytest.raises(ProtocolError, match="disagree"):
        ModelHeader.from_metadata({"snake.model": '{"versions": {"a": 1}, "digests": {}, "sent": []}'})
    assert ModelHeader.from_metadata({"compression": "none"}) is None  # a plain model
    lying = ModelHeader({"a": 1, "b": 1, "c": 1}, {"a": "0" * 64, "b": "0" * 64, "c": "0" * 64}, ("a", "b", "c"))
    data = encode_tensors(model(), metadata=lying.metadata())
    payload, header = decode_model(data)
    assert header is not None
    with pytest.raises(ProtocolError, match="does not match its digest"):
        assemble(payload, header, LAYOUT, None)


def test_codec_decodes_without_copying_and_refuses_garbage() -> None:
    tensors = model()
    data = encode_tensors(tensors, "none", {"k": "v"})
    views, meta = decode_views(data)
    assert meta == {"compression": "none", "k": "v"}
    assert all(not v.flags.writeable and np.array_equal(v, tensors[n]) for n, v in views.items())
    copies = decode_tensors(data)
    assert all(c.flags.writeable for c in copies.values())
    half = decode_tensors(encode_tensors(tensors, "fp16"))
    assert all(h.dtype == np.float32 and np.array_equal(h, tensors[n]) for n, h in half.items())
    for bad in (b"", b"\x00" * 7, b"\xff" * 16, (8).to_bytes(8, "little") + b"[1,2,3] ", data[:-4]):
        with pytest.raises(ProtocolError):
            decode_views(bad)


def test_model_cache_is_replaced_atomically_and_scoped_to_its_trial(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "models")
    assert cache.load("t1") is None
    cache.save("t1", 3, {"a": 3}, model(), model_digest(model()))
    cache.save("t1", 7, {"a": 7}, model(1.0), model_digest(model(1.0)))  # replaces the first
    got = cache.load("t1")
    assert got is not None and got.hop == 7 and got.base.versions == {"a": 7}
    assert got.digest == model_digest(got.base.tensors) != model_digest(model())
    assert all(np.array_equal(got.base.tensors[n], v) for n, v in model(1.0).items())
    assert cache.load("t2") is None  # another trial's copy is no base
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["last_model.safetensors"]  # no temporaries left
    cache.path.write_bytes(cache.path.read_bytes()[:100])  # a damaged file reads as "no copy"
    assert cache.load("t1") is None
    cache.path.write_bytes(b"")
    assert cache.load("t1") is None


def test_a_trainer_that_changes_a_frozen_group_is_refused() -> None:
    from edge_agent.handover import hand_on
    from edge_agent.protocol.messages import HopTask
    from edge_agent.trainer import TrainerError
    from tools.fakes import MemoryModelCache

    task = HopTask(0, 4, 1, ["b"], ["b.w"], "0" * 64, 1, "x", "y", 1, 8, 0.1, 0, next_holds={"a": 0, "b": 0, "c": 0})
    before = model()
    versions, digests = {"a": 0, "b": 0, "c": 0}, digests_of(before, LAYOUT)
    cache = MemoryModelCache()
    good = {**before, "b.w": before["b.w"] + 1}
    out = hand_on(task, good, versions, digests, LAYOUT, "none", cache, "t")
    payload, header = decode_model(out.data)
    assert header is not None and header.sent == ("b",) and header.versions == {"a": 0, "b": 4, "c": 0}
    assert cache.kept is not None and cache.kept.hop == 4
    leaky = {**good, "c.w": before["c.w"] + 1}
    with pytest.raises(TrainerError, match="frozen layer group 'c'"):
        hand_on(task, leaky, versions, digests, LAYOUT, "none", cache, "t")
