"""One trial end to end on the coordinator: prepare, run over MQTT, evaluate, write results."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from coordinator.config import TrialConfig
from coordinator.controller import Event, TrialSetup
from coordinator.display import TrialDisplay
from coordinator.errors import TrialError
from coordinator.evaluate import evaluate_onnx, finalize
from coordinator.prepare import Prepared, prepare
from coordinator.results import RunRecord
from coordinator.scheduler import HopSettings
from coordinator.service import TrialService
from coordinator.split import SplitStrategy
from coordinator.split_back import TorchBack
from coordinator.strategy import FedAvgStrategy, SnakeStrategy, Strategy
from edge_agent.data import Dataset, to_float
from edge_agent.protocol.codec import decode_tensors, encode_tensors
from models import InputSpec

log = logging.getLogger(__name__)


def input_spec(ds: Dataset) -> InputSpec:
    c, h, w = ds.input_shape
    return InputSpec(c, h, w, ds.num_classes)


def trial_setup(config: TrialConfig, prepared: Prepared) -> TrialSetup:
    t = config.train
    strategy: Strategy = (
        FedAvgStrategy(config.transfer.compression)
        if config.algorithm == "fedavg"
        else SnakeStrategy(config.transfer.compression)
    )
    if config.algorithm == "split":
        back = TorchBack(prepared.model, prepared.cut, t.optimizer, t.lr)
        strategy = SplitStrategy(back, config.transfer.compression)
    return TrialSetup(
        trial_id=f"{config.name}-{uuid.uuid4().hex[:8]}",
        expected_agents=config.agents,
        plan_for=prepared.plan_for(config),
        artifacts={},
        blobs={},
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
        ),  # fmt: skip
        chunk_bytes=config.transfer.chunk_bytes,
        compression=config.transfer.compression,
        join_timeout_s=config.timeouts.join_s,
        hop_timeout_s=config.timeouts.hop_s,
        strategy=strategy,
        build_artifacts=prepared.artifacts_for,
    )


class RoundEvaluator:
    """Turns each round's model (a checkpoint event) into a test-set evaluation in the run record.

    Evaluation runs in a worker thread: the coordinator's message loop must keep acknowledging
    transfers while a large model is exported and evaluated."""

    def __init__(self, prepared: Prepared, dataset: Dataset, record: RunRecord, work: Path) -> None:
        self.prepared, self.record, self.work = prepared, record, work
        self.x, self.y = to_float(dataset.x_test), dataset.y_test
        self.service: TrialService | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")
        self.pending: list[Future[None]] = []
        self.seen: set[int] = set()

    def __call__(self, event: Event) -> None:
        if event.kind != "checkpoint" or self.service is None or event.body[0] in self.seen:
            return
        round_, data = event.body
        self.seen.add(round_)
        # what the algorithm moved so far: everything the coordinator sent + the model each hop handed on
        # (+ split learning's activations, which agents send batch by batch)
        ctl = self.service.controller
        sent = self.service.link.bytes_sent + sum(int(h["model_bytes"]) for h in self.record.hops)
        sent += ctl.activation_bytes if ctl is not None else 0
        self.pending.append(self.pool.submit(self._evaluate, round_, data, sent))

    def wait(self) -> None:
        for future in self.pending:
            future.result()
        self.pool.shutdown()

    def _evaluate(self, round_: int, data: bytes, sent: int) -> None:
        path = self.work / f"round_model_{round_}.onnx"
        onnx_path = finalize(self.prepared.model, decode_tensors(data), self.prepared.forward.input_shape, path)
        test = evaluate_onnx(onnx_path, self.x, self.y)
        onnx_path.unlink(missing_ok=True)
        self.record.round_done(round_, test.accuracy, test.loss, sent)
        log.info(
            "round %d: test accuracy %.4f (loss %.4f), %.1f MB so far", round_, test.accuracy, test.loss, sent / 1e6
        )


def run_trial(
    config: TrialConfig,
    broker: str,
    out: Path,
    dataset: Dataset,
    exit_agents: bool,
    stop: Callable[[], bool] = lambda: False,
    show_progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a whole trial against agents on ``broker``; returns (and writes) the summary."""
    started = time.monotonic()
    record = RunRecord(out)
    with TrialDisplay(record, enabled=show_progress) as display:
        display.status(f"exporting {config.model} and measuring its layer groups")
        prepared = prepare(config, input_spec(dataset), out / "work")
        setup = trial_setup(config, prepared)
        display.status(f"trial {setup.trial_id}: waiting for {config.agents} agent(s)")
        rounds = RoundEvaluator(prepared, dataset, record, out / "work")
        service = TrialService(broker, setup, lambda e: (display(e), rounds(e)))
        rounds.service = service
        try:
            outcome = service.run(exit_agents, stop)
        finally:
            rounds.wait()
        if outcome.failed is not None or outcome.final_model is None:
            record.write_summary(
                record.summary(_base(config, setup.trial_id, extra) | {"failed": outcome.failed}, outcome.bytes_sent)
            )
            raise TrialError(outcome.failed or "no final model")
        display.status("evaluating the final model on the test set")
        tensors = decode_tensors(outcome.final_model)
        onnx_path = finalize(prepared.model, tensors, prepared.forward.input_shape, out / "final_model.onnx")
        test = evaluate_onnx(onnx_path, to_float(dataset.x_test), dataset.y_test)
    base = _base(config, setup.trial_id, extra) | {
        "final_test_accuracy": round(test.accuracy, 6),
        "final_test_loss": round(test.loss, 6),
        "test_samples": test.samples,
        "wall_s": round(time.monotonic() - started, 3),
        "trial_s": round(outcome.wall_s, 3),
        "segments": [{"index": s.index, "groups": list(s.groups), "params": s.num_params} for s in prepared.segments],
        "plan": prepared.plan.as_dict() if prepared.plan else None,
        "final_model": str(onnx_path),
    }
    ctl = service.controller
    summary = record.summary(base, outcome.bytes_sent, ctl.checkpoint_bytes if ctl else 0, outcome.bytes_received)
    if config.algorithm == "split" and ctl is not None:
        summary |= {"split_cut": prepared.cut, "bytes_activations": ctl.activation_bytes,
                    "bytes_gradients": ctl.gradient_bytes}  # fmt: skip
    record.write_summary(summary)
    record.plot()
    log.info("final test accuracy %.4f (loss %.4f) on %d samples", test.accuracy, test.loss, test.samples)
    return summary


def _base(config: TrialConfig, trial_id: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "trial_id": trial_id,
        "algorithm": config.algorithm,
        "mode": "cs" if config.algorithm in ("fedavg", "split") else config.mode,  # both are stars by nature
        "model": config.model,
        "dataset": config.dataset,
        "partition": config.partition,
        "rounds": config.rounds,
        "num_agents": config.agents,
        "epochs": config.train.epochs,
        "batch_size": config.train.batch_size,
        "lr": config.train.lr,
        "compression": config.transfer.compression,
        "kd_alpha": config.train.kd_alpha,
        "kd_temperature": config.train.kd_temperature,
        **(extra or {}),
    }
