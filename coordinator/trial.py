"""One trial end to end on the coordinator: prepare, run over MQTT, evaluate, write results."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from coordinator.config import TrialConfig
from coordinator.controller import TrialSetup
from coordinator.display import TrialDisplay
from coordinator.errors import ConfigError, TrialError
from coordinator.evaluate import TestResult, evaluate_onnx, finalize
from coordinator.events import BackStep, BuildArtifacts, Built, EvaluateRound, Evaluation, Event, Relayed, Stepped
from coordinator.export import TASK_CLASSIFY
from coordinator.journal import Journal, Journaled
from coordinator.lm_report import write_run_report
from coordinator.prepare import Prepared, prepare
from coordinator.results import RunRecord
from coordinator.scheduler import HopSettings
from coordinator.service import TrialService, mqtt_link
from coordinator.split import Back, SplitStrategy
from coordinator.split_back import TorchBack
from coordinator.strategy import FedAvgStrategy, SnakeStrategy, Strategy
from edge_agent.data import Dataset, to_float
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from models import InputSpec

log = logging.getLogger(__name__)


def input_spec(ds: Dataset) -> InputSpec:
    c, h, w = ds.input_shape
    return InputSpec(c, h, w, ds.num_classes)


class Workload(Protocol):
    """What a trial trains for: the model's input, its starting weights, how it is evaluated."""

    spec: InputSpec
    task: str
    initial: Mapping[str, np.ndarray] | None  # None: the seeded random init

    def evaluate(self, onnx_path: Path) -> TestResult: ...

    def finish(self, model: Any, initial: Mapping[str, np.ndarray], final_onnx: Path, out: Path) -> dict[str, Any]:
        """Extra summary fields once the final model is evaluated."""
        ...


class ImageWorkload:
    """A classifier on an image data set's test split."""

    task: str = TASK_CLASSIFY
    initial: Mapping[str, np.ndarray] | None = None

    def __init__(self, ds: Dataset) -> None:
        self.spec, self.x, self.y = input_spec(ds), to_float(ds.x_test), ds.y_test

    def evaluate(self, onnx_path: Path) -> TestResult:
        return evaluate_onnx(onnx_path, self.x, self.y)

    def finish(self, model: Any, initial: Mapping[str, np.ndarray], final_onnx: Path, out: Path) -> dict[str, Any]:
        return {}


def trial_setup(
    config: TrialConfig, prepared: Prepared, back: Back | None = None, trial_id: str | None = None
) -> TrialSetup:
    t = config.train
    strategy: Strategy = (
        FedAvgStrategy(config.transfer.compression)
        if config.algorithm in ("fedavg", "fedprox")
        else SnakeStrategy(config.transfer.compression)
    )
    if config.algorithm == "split":
        assert back is not None, "split learning needs the coordinator's back"
        strategy = SplitStrategy(back, config.transfer.compression)
    return TrialSetup(
        trial_id=trial_id or f"{config.name}-{uuid.uuid4().hex[:8]}",
        expected_agents=config.agents,
        plan_for=prepared.plan_for(config),
        initial_model=encode_tensors(prepared.forward.tensors),
        settings=HopSettings(
            t.epochs,
            t.batch_size,
            t.lr,
            config.seed,
            t.max_steps or None,
            config.eval_every_round,
            t.kd_alpha,
            t.kd_temperature,
            config.timeouts.gradient_s,
            t.prox_mu if config.algorithm == "fedprox" else 0.0,
            t.lr_decay,
        ),  # fmt: skip
        chunk_bytes=config.transfer.chunk_bytes,
        compression=config.transfer.compression,
        join_timeout_s=config.timeouts.join_s,
        hop_timeout_s=config.timeouts.hop_s,
        strategy=strategy,
        reroute=prepared.reroute_for(config) if config.algorithm == "snake" else None,
        offline_grace_s=config.timeouts.offline_s,
        holder_grace_s=config.timeouts.holder_s,
        silence_s=config.timeouts.silence_s,
    )


def make_back(config: TrialConfig, prepared: Prepared) -> Back | None:
    """Split learning's back (torch), trained by the coordinator; None for the other algorithms."""
    if config.algorithm != "split":
        return None
    return TorchBack(prepared.model, prepared.cut, config.train.optimizer, config.train.lr)


class TrialJobs:
    """The controller's slow work for a real trial: artifacts, split back steps, round evaluations."""

    def __init__(self, prepared: Prepared, workload: Workload, work: Path, back: Back | None) -> None:
        self.prepared, self.workload, self.work, self.back = prepared, workload, work, back

    def build(self, job: BuildArtifacts) -> Built:
        return Built(*self.prepared.artifacts_for(job.plan))

    def back_step(self, job: BackStep) -> Stepped:
        if self.back is None:
            raise TrialError("no back to train: this trial is not split learning")
        try:
            gradient, loss = self.back.step(job.activations, job.labels)
        except (RuntimeError, ValueError, IndexError) as exc:  # shapes or labels that do not fit the back
            raise TrialError(str(exc)) from exc
        return Stepped(gradient, loss)

    def evaluate(self, job: EvaluateRound) -> Evaluation:
        path = self.work / f"round_model_{job.round}.onnx"
        forward = self.prepared.forward
        onnx_path = finalize(self.prepared.model, decode_tensors(job.model), forward.input_shape, path, forward.task)
        test = self.workload.evaluate(onnx_path)
        onnx_path.unlink(missing_ok=True)
        return Evaluation(test.accuracy, test.loss)


def run_trial(
    config: TrialConfig,
    broker: str,
    out: Path,
    dataset: Dataset | Workload,
    exit_agents: bool,
    stop: Callable[[], bool] = lambda: False,
    show_progress: bool = True,
    extra: dict[str, Any] | None = None,
    resume: bool = False,
    provisioned: Path | None = None,
) -> dict[str, Any]:
    """Run a whole trial against agents on ``broker``; returns (and writes) the summary. ``resume``: carry on
    the trial whose journal is in ``out`` (its coordinator was killed). ``dataset``: an image data set's test
    split, or a :class:`Workload` (a language model's: :mod:`coordinator.lm_trial`)."""
    workload = ImageWorkload(dataset) if isinstance(dataset, Dataset) else dataset
    started = time.monotonic()
    journal = Journal(out)
    journaled = read_journal(journal, config) if resume else None
    record = RunRecord(out)
    with TrialDisplay(enabled=show_progress) as display:
        display.status(f"exporting {config.model} and measuring its layer groups")
        prepared = prepare(config, workload.spec, out / "work", workload.initial)
        back = make_back(config, prepared)
        setup = trial_setup(config, prepared, back, journaled.trial_id if journaled else None)
        if journaled is None:
            journal.start(setup.trial_id, config_json(config))
        else:
            for event in journaled.events:  # metrics.jsonl, rounds.jsonl and the figures, as they were
                record.record(event)
        display.status(f"trial {setup.trial_id}: waiting for {config.agents} agent(s)")
        jobs = TrialJobs(prepared, workload, out / "work", back)
        service: TrialService

        def on_event(event: Event) -> None:
            journal.record(event)  # before the step's messages go out
            if isinstance(event, Relayed) and isinstance(setup.strategy, SnakeStrategy):
                assert service.controller.plan is not None
                journal.keep_model(*setup.strategy.snapshot(service.controller.plan))
            journal.count(service.controller.counters())
            record.record(event)
            display(event)

        held = (journaled.events, journaled.counters, journaled.model) if journaled else None
        link = mqtt_link(broker, setup.trial_id, provisioned)  # provisioned: TLS + signatures (security)
        service = TrialService(link, setup, jobs, on_event, resume_from=held)
        try:
            outcome = service.run(exit_agents, stop)
        finally:
            journal.close()
        record.rejections["coordinator"] = service.controller.rejections.as_dict()
        if outcome.failed is not None or outcome.final_model is None:
            summary = record.summary(
                _base(config, setup.trial_id, extra) | {"failed": outcome.failed}, outcome.bytes_sent
            )
            record.write_summary(summary | faults_summary(service, record))
            raise TrialError(outcome.failed or "no final model")
        display.status("evaluating the final model on the test set")
        tensors = decode_tensors(outcome.final_model)
        forward = prepared.forward
        onnx_path = finalize(prepared.model, tensors, forward.input_shape, out / "final_model.onnx", forward.task)
        test = workload.evaluate(onnx_path)
        extra_fields = workload.finish(prepared.model, forward.tensors, onnx_path, out)
    base = _base(config, setup.trial_id, extra) | {
        "final_test_accuracy": round(test.accuracy, 6),
        "final_test_loss": round(test.loss, 6),
        "test_samples": test.samples,
        "wall_s": round(time.monotonic() - started, 3),
        "trial_s": round(outcome.wall_s, 3),
        "segments": [{"index": s.index, "groups": list(s.groups), "params": s.num_params} for s in prepared.segments],
        "plan": prepared.plan.as_dict() if prepared.plan else None,
        "final_model": str(onnx_path),
        **extra_fields,
    }
    ctl = service.controller
    summary = record.summary(base, outcome.bytes_sent, ctl.checkpoint_bytes, outcome.bytes_received)
    summary |= faults_summary(service, record)
    if ctl.plan is not None and ctl.plan != ctl.original:
        summary["route"] = ctl.plan.as_dict()["hops"]  # the plan as re-routed around faults
    if journaled is not None:
        summary["resumed"] = True
    if config.algorithm == "split":
        summary |= {"split_cut": prepared.cut, "bytes_activations": ctl.activation_bytes,
                    "bytes_gradients": ctl.gradient_bytes}  # fmt: skip
    record.write_summary(summary)
    record.plot()
    if "final_perplexity" in summary:
        write_run_report(summary, out)
    log.info("final test accuracy %.4f (loss %.4f) on %d samples", test.accuracy, test.loss, test.samples)
    return summary


def config_json(config: TrialConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def read_journal(journal: Journal, config: TrialConfig) -> Journaled:
    """The journal of the trial to resume; refuses a trial file that differs from the one it ran with."""
    journaled = journal.read()
    now = config_json(config)
    changed = sorted(k for k in set(now) | set(journaled.config) if now.get(k) != journaled.config.get(k))
    if changed:
        raise ConfigError(
            f"the trial in {journal.dir} ran with other settings ({', '.join(changed)} differ); "
            "resume it with the same trial file and options"
        )
    return journaled


def faults_summary(service: TrialService, record: RunRecord) -> dict[str, Any]:
    """What went wrong and what it cost: ``faults`` (from the record), hops trained again, finished hops whose
    output was lost, bytes sent again (the coordinator's and what the agents reported in their byes)."""
    ctl = service.controller
    return {
        "hops_retried": ctl.hops_retried,
        "hops_lost": ctl.hops_lost,
        "hops_unreported": sorted(ctl.unreported),  # finished (a later hop started from them), report lost
        "bytes_retransmitted": ctl.bytes_retransmitted + sum(record.retransmitted.values()),
        "lost_agents": dict(ctl.lost),
    }


def _base(config: TrialConfig, trial_id: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "trial_id": trial_id,
        "algorithm": config.algorithm,
        "mode": "cs" if config.algorithm in ("fedavg", "fedprox", "split") else config.mode,  # both are stars by nature
        "model": config.model,
        "dataset": config.dataset,
        "partition": config.partition,
        "rounds": config.rounds,
        "num_agents": config.agents,
        "epochs": config.train.epochs,
        "batch_size": config.train.batch_size,
        "lr": config.train.lr,
        "lr_decay": config.train.lr_decay,
        "compression": config.transfer.compression,
        "kd_alpha": config.train.kd_alpha,
        "kd_temperature": config.train.kd_temperature,
        **({"lora": config.lora.as_dict()} if config.lora.enabled else {}),
        **(extra or {}),
    }
