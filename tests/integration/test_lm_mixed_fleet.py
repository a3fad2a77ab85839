"""A GPT trial on Jane Austen's text with a mixed fleet: an `ort` agent and a `portable` agent (lowered
bundles, InferenceSession + numpy optimizer) train consecutive segments and hand the model on over a
real mosquitto, as agent processes. Driven with the trial's own pieces (prepare, trial_setup,
TrialService); `simulate --model gpt` wires the same pieces once it takes token data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.broker import RunningBroker
from coordinator.config import load_trial
from coordinator.evaluate import evaluate_lm_onnx, finalize
from coordinator.events import BackStep, BuildArtifacts, Built, EvaluateRound, Evaluation, Event, HopFinished, Stepped
from coordinator.export import TASK_CAUSAL_LM
from coordinator.partitions import write_token_partitions
from coordinator.prepare import Prepared, prepare
from coordinator.service import TrialService, mqtt_link
from coordinator.simulate import AgentProcesses
from coordinator.text.austen import TextDataError, load_austen
from coordinator.text.sequences import build_token_dataset
from coordinator.trial import trial_setup
from edge_agent.protocol.codec import decode_tensors
from edge_agent.textdata import lm_pairs
from models import InputSpec

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.ort, pytest.mark.torch, pytest.mark.timeout(300)]

SEQ_LEN = 16
BACKENDS = ("ort", "portable")
CHARS = 40_000  # of each of two novels: a few hundred validation and test sequences, so the test stays short


class BuildOnly:
    """The controller's jobs for this trial: bundles only (no split back, no per-round evaluation)."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared

    def build(self, job: BuildArtifacts) -> Built:
        return Built(*self.prepared.artifacts_for(job.plan))

    def back_step(self, job: BackStep) -> Stepped:
        raise AssertionError("no split learning here")

    def evaluate(self, job: EvaluateRound) -> Evaluation:
        raise AssertionError("no per-round evaluation here")


def test_ort_and_portable_agents_train_consecutive_gpt_segments(mosquitto: RunningBroker, tmp_path: Path) -> None:
    try:
        novels = list(load_austen().items())[:2]
    except TextDataError as exc:
        pytest.skip(str(exc))
    ds = build_token_dataset("austen", {name: text[:CHARS] for name, text in novels}, SEQ_LEN)
    config = load_trial(None, {"model": "gpt", "dataset": "austen", "partition": "by-source", "agents": 2,
                               "rounds": 2, "samples_per_agent": 128, "train.batch_size": 16,
                               "eval_every_round": False})  # fmt: skip
    agents = AgentProcesses()
    try:
        for i, (path, backend) in enumerate(zip(write_token_partitions(config, ds, tmp_path / "data"), BACKENDS, strict=True)):  # fmt: skip
            agents.spawn(f"agent-{i}", mosquitto.url, path, tmp_path, backend, 1, calibrate=False)
        prepared = prepare(config, InputSpec(num_classes=ds.vocab_size, seq_len=SEQ_LEN), tmp_path / "work")
        setup = trial_setup(config, prepared)
        hops: list[HopFinished] = []

        def on_event(event: Event) -> None:
            if isinstance(event, HopFinished):
                hops.append(event)

        service = TrialService(mqtt_link(mosquitto.url, setup.trial_id), setup, BuildOnly(prepared), on_event)
        outcome = service.run(exit_agents=True, stop=lambda: agents.crashed() is not None)
    finally:
        agents.stop()
    assert outcome.failed is None and outcome.final_model is not None, (outcome.failed, agents.crashed())
    backends = {agent: hello.backend for agent, hello in service.controller.hellos.items()}
    assert backends == {"agent-0": "ort", "agent-1": "portable"}
    assert len(hops) == 4 and all({h.agent for h in hops if h.report.round == r} == set(backends) for r in (0, 1))
    trained = {(h.agent, group) for h in hops for group in prepared.segments[h.report.segment].groups}
    assert ("agent-1", "embed") in trained and ("agent-0", "embed") in trained  # GatherGrad + the tied head
    assert all(np.isfinite(h.report.train_loss) and h.report.steps == 8 for h in hops)
    kinds = {json.loads(p.read_text())["kind"] for p in (tmp_path / "cache" / "agent-1").rglob("manifest.json")}
    assert kinds == {"portable"}
    x, y = lm_pairs(ds.x_test, ds.pad_id)
    perplexity = {}
    for name, tensors in (("base", prepared.forward.tensors), ("final", decode_tensors(outcome.final_model))):
        onnx_path = finalize(prepared.model, tensors, (SEQ_LEN,), tmp_path / f"{name}.onnx", TASK_CAUSAL_LM)
        perplexity[name] = evaluate_lm_onnx(onnx_path, x, y).perplexity
    assert perplexity["final"] < 0.5 * perplexity["base"], perplexity  # both hops learnt from the novels
