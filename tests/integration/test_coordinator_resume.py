"""The coordinator process is SIGKILLed mid-trial and started again with ``--resume RUN_DIR``: real mosquitto,
agent processes and coordinator processes (tools/loopback.py). What the agents sent while it was down waits
in the broker for its persistent session; the resumed trial ends on the model an uninterrupted one ends on,
and no hop is trained twice."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from edge_agent.protocol.envelope import Envelope
from tools.faultkit import Watch
from tools.loopback import LoopbackTrial, metrics_hops, model_digest, trained_hops, write_trial_file

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(300)]

SETTINGS = {"name": "resume", "model": "mlp", "agents": 3, "rounds": 3, "samples_per_agent": 1200, "seed": 3,
            "train.batch_size": 32, "train.epochs": 3}  # fmt: skip
HOPS = 9  # 3 agents x 3 rounds; hops long enough (~1-2 s) that the coordinator is back before the last
KILL_AT_HOP = 2


def run(root: Path, kill_at_hop: int | None) -> LoopbackTrial:
    """The trial on its own mosquitto with --no-calibrate agents; the coordinator SIGKILLed when the agent of
    ``kill_at_hop`` reports that hop started, then resumed. Returns the (stopped) trial."""
    trial = write_trial_file(root / "trial.toml", SETTINGS)
    started = threading.Event()

    def on_envelope(topic: str, env: Envelope) -> None:
        if env.type == "hop_started" and env.body.get("hop") == kill_at_hop:
            started.set()

    with LoopbackTrial(trial, root / "run") as lt:
        lt.start_broker()
        watch = Watch(lt.broker.port if lt.broker else 0, on_envelope)
        try:
            lt.start_agents(calibrate=False)
            lt.start_coordinator()
            if kill_at_hop is not None:
                assert started.wait(150), f"hop {kill_at_hop} never started:\n{lt.coordinator_log_tail()}"
                assert lt.kill_coordinator(), "the coordinator had already exited"
                lt.resume_coordinator()
            code = lt.wait_coordinator(180)
        finally:
            watch.close()
        assert code == 0, f"the coordinator exited with {code}:\n{lt.coordinator_log_tail()}"
    return lt


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> LoopbackTrial:
    """The same trial without a kill (same seed, same --no-calibrate agents, so the same plan)."""
    return run(tmp_path_factory.mktemp("reference"), kill_at_hop=None)


def test_a_killed_coordinator_resumes_and_ends_on_the_uninterrupted_model(
    tmp_path: Path, reference: LoopbackTrial
) -> None:
    lt = run(tmp_path, kill_at_hop=KILL_AT_HOP)
    summary = lt.summary()
    assert lt.lives == 2 and summary["resumed"] is True
    assert summary["hops"] == HOPS and summary["hops_lost"] == 0 and summary["hops_retried"] == 0
    assert model_digest(lt.out) is not None and model_digest(lt.out) == model_digest(reference.out)
    # no hop trained twice: once in metrics.jsonl, once in the logs of the agents (across all of them)
    assert sorted(metrics_hops(lt.out)) == list(range(HOPS))
    trained = sum(trained_hops(lt.out).values(), Counter())
    assert trained == Counter(range(HOPS)), trained
    assert "resuming trial" in (lt.out / "logs" / "coordinator.log").read_text()
