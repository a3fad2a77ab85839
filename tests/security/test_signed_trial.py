"""Signed trials: whole trials with the real services and SecureLink (keys from ``provision``) over the
in-memory broker (tests/protocol/trial_bed.py), attacked by an agent that holds valid credentials of its own."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from coordinator.provision import ProvisionSpec, provision
from coordinator.service import TrialService
from edge_agent.config import AgentConfig
from edge_agent.keys import FileSigner, TrustDir
from edge_agent.link import Clock
from edge_agent.memlink import MemoryLink
from edge_agent.protocol import topics
from edge_agent.protocol.envelope import Envelope, decode, encode, new_id
from edge_agent.protocol.errors import ProtocolError
from edge_agent.protocol.kinds import MessageType
from edge_agent.protocol.signing import DUPLICATE_S, Authenticator, SequenceNumbers, sign
from edge_agent.secure_link import load_secure_link
from edge_agent.service import AgentService, status_payload
from tests.protocol.trial_bed import TrialBed, local_data
from tools.fakes import InlineExecutor


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bed-keys")
    provision(ProvisionSpec(root, ("a0", "a1", "a2")))
    return root


@dataclasses.dataclass
class SecureBed(TrialBed):
    keys: Path | None = None

    def coordinator_service(self, resume_from: object = None) -> TrialService:
        service = super().coordinator_service(resume_from)
        if self.keys is not None:
            home = self.keys / "coordinator"
            clock: Clock = self.clock
            service.link = load_secure_link(service.link, "coordinator", home / "signing.key", home / "trust", clock)
        return service

    def agent(self, name: str, index: int) -> AgentService:
        if self.keys is None:
            return super().agent(name, index)
        home = self.keys / "agents" / name
        config = AgentConfig(name, "memory://", "-", cache_dir=self.tmp / name, calibrate=False,
                             map_large_allocations=False, signing_key=home / "signing.key", trust_dir=home / "trust")  # fmt: skip
        will = (topics.agent_status(name), status_payload(name, "offline", 0.0), True)
        link = MemoryLink(self.broker, f"agent-{name}", [topics.agent_inbox(name)], will)
        data = local_data(self.samples[index % len(self.samples)])
        return AgentService(config, data, link, self.trainers[name], self.caches[name], self.clock, InlineExecutor())


def _final(bed: TrialBed) -> dict[str, np.ndarray]:
    assert bed.ctl.failed is None, bed.ctl.failed
    return bed.final


def test_a_signed_trial_ends_as_the_plain_one(tmp_path: Path, keys: Path) -> None:
    plain = TrialBed(tmp_path / "plain", agents=3, rounds=2)
    plain.run()
    bed = SecureBed(tmp_path / "secure", agents=3, rounds=2, keys=keys)
    bed.run()
    for name, value in _final(plain).items():
        np.testing.assert_array_equal(_final(bed)[name], value)
    published = [decode(p) for _, p in bed.broker.published]
    assert all(e.sig is not None for e in published if e.type != MessageType.STATUS)  # everything else signed
    assert all(s.link.rejections.total == 0 for s in bed.services.values())  # type: ignore[attr-defined]


def test_forged_commands_forged_hand_offs_and_replays_change_nothing(tmp_path: Path, keys: Path) -> None:
    reference = SecureBed(tmp_path / "ref", agents=3, rounds=2, keys=keys)
    reference.run()
    bed = SecureBed(tmp_path / "attacked", agents=3, rounds=2, keys=keys)
    bed.run(until=lambda: any(e.type == MessageType.CHUNK and e.src != "coordinator" for e in _frames(bed)))
    genuine = [e for e in _frames(bed) if e.src != "coordinator"]  # the first hand-off between agents
    sender, receiver = genuine[0].src, genuine[0].dst
    attacker = next(a for a in ("a0", "a1", "a2") if a not in (sender, receiver))
    forger, numbers = FileSigner(keys / "agents" / attacker / "signing.key"), SequenceNumbers()

    def inject(env: Envelope) -> None:
        bed.broker.publish(topics.inbox(env.dst), encode(sign(env, forger, numbers.next(bed.clock.time()))))

    assign = next(e for e in bed.sent(MessageType.ASSIGN) if e.dst == receiver)
    inject(dataclasses.replace(assign, id=new_id(), seq=None, sig=None))  # "from the coordinator", attacker's key
    inject(dataclasses.replace(assign, id=new_id(), src=attacker, seq=None, sig=None))  # as itself: no commands
    poison = dataclasses.replace(genuine[0], id=new_id(), data=bytes(len(genuine[0].data or b"")), seq=None, sig=None)
    inject(poison)  # a hand-off in the sender's name, bytes of the attacker's choice
    bed.run(until=lambda: len(bed.log) >= 3)
    bed.clock.advance(DUPLICATE_S + 1)
    replayed = genuine[0]  # the first genuine hand-off again, as it was signed (accepted a minute ago)
    bed.broker.publish(topics.inbox(replayed.dst), encode(replayed))
    bed.run()

    refused = bed.services[receiver].link.rejections.as_dict()  # type: ignore[attr-defined]
    assert refused.get("bad_signature") == 2 and refused.get("not_allowed") == 1
    assert refused.get("replay", 0) >= 1
    errors = [e for e in bed.sent(MessageType.ERROR) if e.src == receiver]
    assert {e.error["code"] for e in errors if e.error} >= {"bad_signature", "not_allowed", "replay"}
    for name, value in _final(reference).items():
        np.testing.assert_array_equal(_final(bed)[name], value)


def _frames(bed: TrialBed) -> list[Envelope]:
    return bed.frames("model")


def test_the_authenticator_refuses_unsigned_altered_and_untrusted(keys: Path) -> None:
    trust = TrustDir(keys / "agents" / "a1" / "trust")
    auth = Authenticator("a1", trust)
    coordinator = FileSigner(keys / "coordinator" / "signing.key")
    env = Envelope(MessageType.ABORT, "coordinator", "a1", {"reason": "stop"}, trial_id="t1", created_at=1.0)
    good = sign(env, coordinator, 1_000_000)
    auth.check(decode(encode(good)), 1.0)  # the wire round trip keeps the signature valid
    cases = {
        "unsigned": env,
        "bad_signature": dataclasses.replace(good, body={"reason": "other"}),
        "misrouted": sign(dataclasses.replace(env, dst="a2"), coordinator, 2_000_000),
    }
    for code, bad in cases.items():
        with pytest.raises(ProtocolError) as caught:
            auth.check(decode(encode(bad)), 2.0)
        assert caught.value.code == code
    status = Envelope(MessageType.STATUS, "a2", "*", {"state": "online"})
    auth.check(status, 3.0)  # the broker's ACL authenticates status topics
    own = sign(env, FileSigner(keys / "agents" / "a1" / "signing.key"), 3_000_000)
    with pytest.raises(ProtocolError):  # a1 is not in its own trust dir: nobody may speak as a1 to a1
        auth.check(dataclasses.replace(own, src="a1"), 4.0)
